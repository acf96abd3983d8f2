"""trainwarden.controller: the sidecar. It observes a job, has the policies decide, and acts through
the job's agent. It imports no torch and nothing from trainwarden.adapters (tests/test_layers.py).

What lives where:
- the contract, read by controller, policies and adapters: protocol.py (wire messages, KNOB_* and
  ENV_* names, Action), snapshot.py (Snapshot, BudgetUse, config_key), schema.py (the budget
  file's dataclasses: Budget, ControllerSettings, PolicyFile), identity.py (token proofs, run ids),
  attach_env.py (the files `run --attach` and the job share);
- the loop: loop.py (Controller: hello, exchange, observe -> decide -> act), state.py and
  forecast.py (the folded picture of the job, throughput), backoff.py (per-kind failure back-off),
  staleness.py (ranks gone silent),
  summary.py (status and summary.json), budget_end.py (a budget's end the job keeps itself);
- serving it: server.py and httpserve.py (the channel), exporter.py (Prometheus), sources.py
  (procfs/NVML memory), runlog.py and rundir.py (the run's logs and directory), logsafe.py,
  channel_security.py;
- the command: cli.py (argparse and dispatch), launch.py and supervise.py (`trainwarden run`),
  report/ (`trainwarden report`).
"""
