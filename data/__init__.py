"""Raw files -> validated, anonymized, featurized, versioned datasets (Ray Data)."""
