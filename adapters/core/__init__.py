"""What every adapter shares, whatever the framework (none of it imports one):

- boundary.py: `StepBoundary`, the step-boundary protocol written once (count the step, advance
  the LR ramp, record telemetry, `agent.on_step`, apply what is due, report the outcomes) and the
  adapter's shared surface (on_stop, report, close);
- agent.py: the agent thread in every rank, and the rank agreement on what applies when;
- channel.py: the agent's side of the channel (HTTP to a sidecar, or an embedded controller);
- link.py, connect.py: finding and joining the controller (`AttachError` when it cannot);
- probes.py: per-rank memory probes;
- stop.py: what a stop does to a job that trains on after it;
- batching.py: the one batch-tree library (regroup, slice, concatenate, re-cut, count).
The knobs every adapter carries alike (LR multiplier and its ramp, the stop, `StopInfo`) are in
`trainwarden.adapters.knobs`, one level up: a user's `on_stop` hook meets them.
"""
