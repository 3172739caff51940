# sandboxrun/_native.c (optional: absent where it was not built)
from collections.abc import Sequence

def fork_reaper(
    close_fds: Sequence[int],
    enter_files: Sequence[str],
    control_fd: int,
    wait_for_go: bool,
    status_w: int,
    zygote_pidfd: int,
    helper_pidfd: int = -1,
) -> tuple[int, int, int]: ...
