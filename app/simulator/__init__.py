"""The provider simulator: a runnable stand-in for the provider's send API, upload endpoint
and DLR emitter (`dlr simulate`; tests and the benchmark import `app.simulator.provider`)."""
