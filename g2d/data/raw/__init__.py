"""Real-data fetch/prepare code, one module per dataset (`g2d.data.raw.<name>`).

Each module defines `fetch(raw_dir, options) -> Path` and `prepare(raw_dir, out_dir, options) -> Path`;
`options` is the dataset's free-form `datasets.<name>.real` block from params.yaml.
"""
