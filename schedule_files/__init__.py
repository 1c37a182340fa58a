"""Schedule and profile files: the versioned JSON schema and the schedules folder."""
