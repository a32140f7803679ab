"""`emojidiff app` (`make app`): the browser page on localhost (Gradio, the optional extra `.[app]`).

    emojidiff app                                    # the packaged model, http://127.0.0.1:7860
    emojidiff app --models [emojidiff:emojidiff-world, /models/sd15-emojidiff] --port 8000

Loads each model of --models once before serving, so a model folder missing a file stops here with
one line naming it; prints the page's address. See `emojidiff.app` for the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# gradio, torch and the models are imported inside run: `emojidiff --help` imports this module (start-up time)
HELP = "the browser page: upload a face and an expression, see the portrait and its scores (make app)"


@dataclass
class AppOptions:
    """app"""

    models: list[str] = field(default_factory=lambda: ["emojidiff:emojidiff-world"])
    """the models the page offers (packaged names or model folders); the first is the default"""
    host: str = "127.0.0.1"
    """the address to serve on (localhost only by default)"""
    port: int = 7860
    """the port"""
    device: str = "cpu"
    """where the models run (cpu, cuda)"""


#: run's keyword arguments -> the option dataclass each is parsed into (`emojidiff.cli`)
OPTIONS = {"opts": AppOptions}


def serve(opts: AppOptions, block: bool = True):
    """Start the page; returns the Gradio app (when not blocking) after printing its address."""
    try:
        from emojidiff.app import PortraitApp, build_page
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise ValueError("the app needs gradio: pip install -e '.[app]' (or make app)") from None
    if not opts.models:
        raise ValueError("--models needs at least one model")
    app = PortraitApp(opts.device)
    for name in opts.models:  # a missing file stops here, with its message, before the page starts
        app.model(name)
    page = build_page(app, opts.models)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=opts.host, server_port=opts.port, prevent_thread_lock=True, show_error=True)
    print(f"emojidiff app: open http://{opts.host}:{opts.port} (Ctrl+C stops it)", flush=True)
    if block:
        page.block_thread()
    return page


def run(opts: AppOptions) -> None:
    serve(opts)
