import logging

import emojidiff  # noqa: F401  (installs the filter)
from emojidiff import _quiet


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(_quiet._LOGGER, logging.WARNING, __file__, 1, message, None, None)


def test_torchvision_advice_is_dropped_other_messages_pass():
    logger = logging.getLogger(_quiet._LOGGER)
    advice = (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    )
    assert not logger.filter(_record(advice))
    assert logger.filter(_record("Could not import module 'Foo'"))


def test_install_is_idempotent():
    _quiet.install()
    _quiet.install()
    logger = logging.getLogger(_quiet._LOGGER)
    assert sum(isinstance(f, _quiet._DropTorchvisionAdvice) for f in logger.filters) == 1
