"""The Hydra configs as the package ``mnv3.conf``: pyproject.toml maps this folder there
(``package-dir``) so a wheel ships every yaml file; ``mnv3.cli.CONFIG_DIR`` finds it by import."""
