"""IDI alterers: each turns targets into candidate templates (same expression, another identity).

Registered: "world-swap", "world-resynth" (world only), "onnx-swapper" (inswapper_128 layout),
"adapter" (a trained E-Adapter model folder), "chain" (alterers applied in sequence).
"""

from data_gen.alterers import adapter, chain, onnx_swapper, world  # noqa: F401  (imported so they register)
