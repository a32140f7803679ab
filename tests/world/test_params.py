"""Identity and expression spaces: sampling, validation, vectors."""

import numpy as np
import pytest

from emojidiff.world import HAIR_STYLES, PRESETS, Expression, Identity


def test_identity_space_is_rich_enough():
    assert Identity.dim() >= 12
    assert Expression.dim() >= 8


def test_identity_sample_is_stable_and_distinct():
    assert Identity.sample(7) == Identity.sample(7)
    vectors = np.stack([Identity.sample(k).to_vector() for k in range(50)])
    assert len({tuple(v) for v in vectors}) == 50
    # every categorical choice and a spread of every continuous value appears in 50 draws
    assert set(vectors[:, Identity.names().index("hair_style")].astype(int)) == set(range(len(HAIR_STYLES)))
    assert (vectors.max(0) - vectors.min(0) > 0.5).all()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_identity_sample_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="identity_id"):
        Identity.sample(bad)


def test_out_of_range_values_name_the_field():
    with pytest.raises(ValueError, match=r"Identity\.eye_size=1\.7 outside \[0\.0, 1\.0\]"):
        Identity(eye_size=1.7)
    with pytest.raises(ValueError, match=r"Expression\.smile=-2\.0 outside"):
        Expression(smile=-2.0)
    with pytest.raises(ValueError, match="hair_style=9 is not a valid choice"):
        Identity(hair_style=9)
    with pytest.raises(TypeError, match="hair_style must be an int"):
        Identity(hair_style=1.5)
    with pytest.raises(ValueError, match="outside"):
        Expression(gaze_x=float("nan"))


def test_vector_round_trip():
    ident = Identity.sample(3)
    back = Identity.from_vector(ident.to_vector())
    np.testing.assert_allclose(back.to_vector(), ident.to_vector())
    assert back.hair_style == ident.hair_style and isinstance(back.hair_style, int)
    expr = Expression.sample(11)
    np.testing.assert_allclose(Expression.from_vector(expr.to_vector()).to_vector(), expr.to_vector())
    with pytest.raises(ValueError, match="needs 10 values"):
        Expression.from_vector([0.0] * 3)


def test_presets_and_samples_are_valid():
    for name in PRESETS:
        Expression.preset(name)  # validates
    assert Expression.preset("wink").eye_open_l == 0.0
    with pytest.raises(KeyError, match="unknown expression preset 'smug'"):
        Expression.preset("smug")
    samples = np.stack([Expression.sample(s).to_vector() for s in range(300)])
    assert (samples >= Expression.lows()).all() and (samples <= Expression.highs()).all()
    assert (samples.std(0) > 0.15).all()  # every parameter actually varies
    assert Expression.sample(5) == Expression.sample(5)
