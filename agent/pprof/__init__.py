"""pprof stage: the pure builder of serialized `perftools.profiles.Profile`s (`builder`, `strings`)."""
