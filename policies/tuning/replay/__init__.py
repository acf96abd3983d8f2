"""The replay: a recorded run played back through a policy file, with the live control loop
(`controller.loop.Controller` on a simulated clock) deciding on a simulated job.

What lives where:
- trace.py: a recorded run as the replay reads it (shape, step records, decisions);
- model.py: how each knob changes memory, step time and loss, calibrated on recorded runs;
- simulate.py: `replay()`, the controller driving the simulated job.
"""
