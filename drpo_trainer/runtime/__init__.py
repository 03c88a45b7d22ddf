"""Running a job: the training loop, the run's state, processes and the bridge between learners and
rollout processes, stop requests, run identity on resume, and pre-flight checks."""
