"""The `qtuning` command line: the top layer (commands -> flows -> tasks -> qtuning).

Library commands (`assets`, `train`, `bench`) run the engine alone; pipeline commands (`run`, `sweep`, `serve`,
`ui`) drive the Prefect flows and the MLflow store and need the `pipeline` extra.
"""
