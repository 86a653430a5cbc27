"""Tools around the core: the `clover2` CLI and what it runs.

bench.py        MT-Bench speed benchmark (plain vs Clover-2 vs other assistants, interleaved)
tune.py         measured tree settings for this device (`clover2 tune`), read back by "auto" settings
demo.py         the README's demo: one prompt, plain vs Clover-2, drafted tokens highlighted
cli.py          the `clover2` command
embedded.py     the embedded default target (SmolLM2-135M-Instruct from its GGUF wheel)
selfdistill.py  the target's own answers as training data
recipes.py      end-to-end training recipes (`clover2 train`)
features.py     a precomputed store of target features for training

Tools depend on the core (config, model, tree, generation, training, data); the core never imports them.
"""
