"""The synthetic knowledge world (SPEC.md section 6): entities drawn with Pillow, facts, splits, writers.

    python -m world.build --config configs/world/demo.yaml --out data/world/demo

- `world.config`: `WorldConfig`, the sizes and seed of one world.
- `world.relations`: relations, value sets, chains, question / caption templates (train and held out).
- `world.render`: an entity's visual identity and its renderings (position, scale, rotation, noise).
- `world.generate`: the world itself: entities, their facts, withheld facts, splits, edits.
- `world.writers`: MMEdit E-VQA / E-IC and VLKEB files plus PNG images, read by `datamodules` unchanged.
- `world.probes`: the probes a backbone is trained and checked on (shared by training and `world.check`).
- `world.tokenizer`: the word-level tokenizer built from the world's vocabulary.
- `world.backbones`: world-sized LLaVA-style and BLIP-2-style models behind the `VLM` interface.
- `world.check`: prints what a trained backbone knows.
"""
