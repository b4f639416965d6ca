"""Training: config and presets, the one training loop, the `Task` contract and its two
implementations (image classification; mazes and prefix sums), the optimizer recipe,
distributed helpers and the run directory. Imports `eval` (validation metrics), `analysis`,
`checkpoint`, `data`, `models`, `layers`; never `studies` or `cli`."""
