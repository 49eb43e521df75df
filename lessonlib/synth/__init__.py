"""Built-in synthetic data sets, one module per lesson (`lessonlib.synth.planet`), sharing `lessonlib.synth.core`."""
