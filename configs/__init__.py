"""Training configurations (LightningCLI YAML), installed as `hmlstm.configs`."""
