"""The decision: pure functions from measurements, facts and weights to scores, sensitivity, capacity, cost and a
hybrid deployment plan. No I/O here: `harness/decide.py` reads the files and calls these."""
