"""User commands behind the `emojidiff` entry point (see `emojidiff.cli`).

Each module has `HELP`, `OPTIONS` (run's keyword arguments -> the option dataclass each is parsed
into; shared groups in `common`), optionally `DEFAULTS` (its defaults of shared options), and
`run(**options)`; heavy imports (torch, diffusers) happen inside `run` so that `emojidiff --help`
stays fast.

- `generate`: identity reference + expression template -> portrait (single, CSV, folder forms);
- `probe-layers`: per-layer / per-block ablation of the expression branch, measured on the world;
- `world-sample`: demo identity references and expression templates from the embedded world;
- `export`: a training checkpoint's (EMA) adapter as a model folder, or a model as diffusers IP-Adapters;
- `package`: a trained model folder's fp16 copy inside the package (`emojidiff:emojidiff-world`);
- `demo`: the main job: a grid of identities wearing templates' expressions, scored, as one PNG;
- `app`: the browser page (Gradio) for one identity and one expression at a time.
"""

#: subcommand -> module
COMMANDS: dict[str, str] = {
    "generate": "emojidiff.commands.generate",
    "probe-layers": "emojidiff.commands.probe_layers",
    "world-sample": "emojidiff.commands.world_sample",
    "export": "emojidiff.commands.export",
    "package": "emojidiff.commands.package",
    "demo": "emojidiff.commands.demo",
    "app": "emojidiff.commands.app",
}
