"""Results that survive a crash, and MLflow on top of them.

- `results.py`: the results.json schema, its atomic write and the one finder of run folders;
- `names.py`: every metric name (MLflow keys, results.json `metrics`, cl-report columns);
- `mlflow_store.py`: MLflow plumbing (tracking URI, reachability, client, experiment, run tags, params);
- `trackers.py`: LocalTracker (results.json) and MlflowTracker (results.json, then MLflow);
- `sync.py`: `cl-report --sync`, what results.json holds and a tracking store missed;
- `records.py`: finished runs as records for tables, from results.json files or from MLflow (cl-report).

Imports point into this package only: nothing here imports the engine, the methods, the report or the
launcher code (what those know, such as torch's thread count, is passed in).
"""
