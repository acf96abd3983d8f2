"""`trainwarden tune`: a layer ABOVE the controller. It searches a policy file's tunable
parameters with Optuna, scoring each trial by driving the live controller: on recorded runs
(replay/, the real `controller.loop.Controller` on a simulated job) or on short real runs.
Nothing below it (controller, policy kinds, adapters) imports it.

What lives where:
- cli.py: the command's arguments and the two modes put together (argparse only at import;
  Optuna is imported when a tune runs);
- study.py: the ask/tell loop over an Optuna study, the trial's policy file;
- space.py: the search space, every tunable parameter of every policy of a file;
- sampler.py: TPE that learns from failed trials;
- claim.py: several workers on one study, each trial claimed once;
- trial_replay.py, trial_run.py: a trial scored by replay, or by a short real run;
- report.py: what tuning bought, the best trial against the file's own values;
- replay/: the replay itself (trace.py reads a recorded run, model.py calibrates the knobs'
  effects, simulate.py runs the controller through it).
"""
