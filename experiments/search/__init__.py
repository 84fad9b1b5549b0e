"""The recipe search by patient cross-validation: its records (`records`), each fold's summary
(`fold_summary`) and per-fold ensembles of recorded recipes (`ensemble_folds`)."""
