"""scaledl: settings, CLI, job entrypoints, workloads and the registry facade."""
