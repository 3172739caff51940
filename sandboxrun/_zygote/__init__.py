"""The zygote launcher (Linux): per-slot fresh interpreters that fork each task into its own
PID namespace. ``client`` is the manager's side, ``server`` the zygote, ``reaper`` the task's
PID 1, ``wire`` the messages between them."""
