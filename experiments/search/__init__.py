"""The recipe search by patient cross-validation: its records (`records`), each fold's summary
(`fold_summary`), per-fold ensembles of recorded recipes (`ensemble_folds`), their tables
(`tables`) and the fold pool packed to travel to another machine (`packed_pool`)."""
