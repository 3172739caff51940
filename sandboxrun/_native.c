/* sandboxrun._native: the zygote's PID 1 in C (Linux only; optional, see _zygote/reaper.py).
 *
 * fork_reaper() is called by the zygote (or its helper) right after unshare(CLONE_NEWPID) and
 * returns in two processes:
 *
 *   zygote --fork--> PID 1 (this file's C only: never returns to Python)
 *                      close the zygote's fds, PR_SET_PDEATHSIG, enter the cgroups,
 *                      [wait until the go frame is readable], fork PID 2, reap, report, _exit
 *                        --fork--> PID 2: oom_score_adj=1000, PyOS_AfterFork_Child(),
 *                                  returns (0, failed, errno)
 *   zygote: returns (PID 1's pid, 0, 0)
 *
 * Why: PID 1 of a Python zygote that runs Python between its own fork and PID 2's pays the
 * interpreter's after-fork work and a copy-on-write fault for every page it writes (measured:
 * 1.35-1.5 ms of CPU and 450-500 faults per task, a third of the whole launch). In C it writes
 * its stack and little else. PID 2 is forked from PID 1's unchanged copy of the zygote's
 * memory, so it is a Python process as if os.fork() had made it: PyOS_BeforeFork() was called
 * before the first fork, PyOS_AfterFork_Child() runs in PID 2 only (the GIL, the import lock,
 * the at-fork hooks). PID 1 only ever calls async-signal-safe functions after its fork.
 *
 * Also the raw syscalls isolation makes in each task (unshare, setns, mount, mount_setattr,
 * prctl, capset), for sandboxrun/_syscalls.py: through ctypes each first call in a fresh child
 * wrote pages of ctypes' own state (argument converters, errno, the CDLL's function cache), a
 * copy-on-write fault each -- here a call is an argument parse and the syscall. Each returns 0
 * or the errno, never raises for the syscall: the caller words the error.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* unshare, setns */
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_MANAGER_GONE 70 /* _protocol.EXIT_MANAGER_GONE */
#define MAX_FDS 64
#define MAX_FILES 16

static int
fd_list(PyObject *seq, int *out, Py_ssize_t *count, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_FDS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: at most %d fds", what, MAX_FDS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (int)fd;
    }
    *count = n;
    Py_DECREF(fast);
    return 0;
}

static void
close_all_but(int keep)
{
    /* close_range(2), Linux 5.9+; else one close per fd of a small table. */
#ifdef SYS_close_range
    if ((keep <= 0 || syscall(SYS_close_range, 0U, (unsigned)keep - 1, 0U) == 0)
        && syscall(SYS_close_range, (unsigned)keep + 1, ~0U, 0U) == 0)
        return;
#endif
    for (int fd = 0; fd < 1024; fd++)
        if (fd != keep)
            close(fd);
}

static int
readable_now(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

static void
wait_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
}

/* PID 1 from its fork on: returns only in PID 2 (failed: the index of the cgroup file that
 * could not be entered, or -1; error: its errno). */
static void
pid1(const int *close_fds, Py_ssize_t n_close, char *const *files, Py_ssize_t n_files,
     int control_fd, int wait_for_go, int status_w, int zygote_pidfd, int helper_pidfd,
     int *failed, int *error)
{
    for (Py_ssize_t i = 0; i < n_close; i++)
        close(close_fds[i]);
    if (helper_pidfd >= 0) {
        /* A pidfd polls readable once its process has exited, after the kernel re-parented
         * its children: from then on our parent is the zygote (a subreaper). The death signal
         * is set only now: the kernel sends it at every parent's exit, the helper's too. */
        wait_readable(helper_pidfd);
        close(helper_pidfd);
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        _exit(EXIT_MANAGER_GONE);
    /* The zygote died before our prctl? (getppid() is 0 for a namespace's PID 1: no use.) */
    if (readable_now(zygote_pidfd))
        _exit(EXIT_MANAGER_GONE);
    close(zygote_pidfd);
    if (getpid() != 1) /* no PID namespace (no privilege for one): keep orphans in our tree */
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    /* Into the cgroups before anything of the task's exists: PID 2 is born inside. */
    for (Py_ssize_t i = 0; i < n_files && *failed < 0; i++) {
        int fd = open(files[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) {
            *failed = (int)i;
            *error = errno;
        }
        if (fd >= 0)
            close(fd);
    }
    /* The manager places us itself (a parent-side attach) and writes the go frame after:
     * readable means placed (or the manager gave up: PID 2 then reads an end of file). */
    if (wait_for_go && *failed < 0)
        wait_readable(control_fd);

    pid_t task = fork();
    if (task == 0) {
        /* PID 2. The zygote and we are the OOM killer's last choice (-1000) in the slot's
         * cgroup: the task must be its first. Here, not in Python: fewer pages written. */
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "1000", 4) != 4)
            _exit(EXIT_MANAGER_GONE);
        close(fd);
        return;
    }
    if (task < 0)
        _exit(EXIT_MANAGER_GONE);
    signal(SIGINT, SIG_IGN); /* Python's handler would only set a flag nobody reads */
    close_all_but(status_w); /* the task's pipes: the manager sees their end with the task's */
    int64_t code = EXIT_MANAGER_GONE;
    for (;;) { /* reap until the task itself ends (the namespace's orphans come to us too) */
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            _exit(EXIT_MANAGER_GONE);
        if (pid == task) {
            code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
            break;
        }
    }
    if (write(status_w, &code, sizeof code) != (ssize_t)sizeof code)
        _exit(EXIT_MANAGER_GONE);
    _exit(0);
}

static PyObject *
fork_reaper(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"close_fds", "enter_files", "control_fd", "wait_for_go",
                            "status_w", "zygote_pidfd", "helper_pidfd", NULL};
    PyObject *close_seq, *files_seq;
    int control_fd, wait_for_go, status_w, zygote_pidfd, helper_pidfd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOipii|i:fork_reaper", names, &close_seq,
                                     &files_seq, &control_fd, &wait_for_go, &status_w,
                                     &zygote_pidfd, &helper_pidfd))
        return NULL;

    int close_fds[MAX_FDS];
    Py_ssize_t n_close = 0;
    if (fd_list(close_seq, close_fds, &n_close, "close_fds") < 0)
        return NULL;
    /* Converted before the fork: PID 1 must not touch a Python object (a refcount write is a
     * copy-on-write fault, and the interpreter is not ours to use there). */
    PyObject *files_fast = PySequence_Fast(files_seq, "enter_files");
    if (files_fast == NULL)
        return NULL;
    Py_ssize_t n_files = PySequence_Fast_GET_SIZE(files_fast);
    if (n_files > MAX_FILES) {
        Py_DECREF(files_fast);
        return PyErr_Format(PyExc_ValueError, "enter_files: at most %d", MAX_FILES);
    }
    PyObject *encoded[MAX_FILES];
    char *files[MAX_FILES];
    Py_ssize_t n_encoded = 0;
    PyObject *result = NULL;
    for (; n_encoded < n_files; n_encoded++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(files_fast, n_encoded),
                                   &encoded[n_encoded]))
            goto done;
        files[n_encoded] = PyBytes_AS_STRING(encoded[n_encoded]);
    }

    int failed = -1, error = 0;
    PyOS_BeforeFork();
    pid_t pid = fork();
    if (pid == 0) {
        pid1(close_fds, n_close, files, n_files, control_fd, wait_for_go, status_w,
             zygote_pidfd, helper_pidfd, &failed, &error);
        PyOS_AfterFork_Child(); /* PID 2 */
        result = Py_BuildValue("(iii)", 0, failed, error);
        goto done;
    }
    int saved = errno;
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("(iii)", (int)pid, 0, 0);
done:
    for (Py_ssize_t i = 0; i < n_encoded; i++)
        Py_DECREF(encoded[i]);
    Py_DECREF(files_fast);
    return result;
}

/* watch(): the zygote's side of one task from STARTED to EXITED (server.Server.watch's steps).
 *
 * From PID 1's fork until it is reaped, every page the zygote writes is shared with PID 1 and
 * PID 2: a copy-on-write fault each. Server.watch's Python wrote ~22 of them per task (frames,
 * refcounts, the sendmsg's buffers; measured: 182 -> 160 zygote faults per task); here it is
 * the stack and a few bytes. */
static int
send_record(int sock, const void *data, size_t size, int fd)
{
    struct iovec iov = {.iov_base = (void *)data, .iov_len = size};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
    }
    ssize_t sent;
    while ((sent = sendmsg(sock, &msg, MSG_NOSIGNAL)) < 0 && errno == EINTR)
        ;
    return sent == (ssize_t)size ? 0 : -1;
}

static PyObject *
watch(PyObject *self, PyObject *args)
{
    int sock, pid, status_r;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "iiIi:watch", &sock, &pid, &flags, &status_r))
        return NULL;
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0); /* before waitpid: no pid reuse yet */
    if (pidfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    char started[1 + 8 + 4] = {'S'}; /* wire.STARTED + STARTED_BODY ("=qI", native order) */
    int64_t pid64 = pid;
    memcpy(started + 1, &pid64, 8);
    memcpy(started + 9, &flags, 4);
    int failed = send_record(sock, started, sizeof started, pidfd);
    int saved = errno;
    close(pidfd);
    if (failed) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    /* PID 2's status as PID 1 wrote it: exactly one record, else PID 1 itself was killed
     * (timeout, OOM, the manager's abort) and its own status is the task's. */
    int64_t code, record = 0;
    char buffer[64];
    size_t total = 0;
    for (;;) { /* drained: whatever is there must not be read as the next task's */
        ssize_t n = read(status_r, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (total < sizeof record)
            memcpy((char *)&record + total, buffer,
                   (size_t)n < sizeof record - total ? (size_t)n : sizeof record - total);
        total += (size_t)n;
    }
    if (total == sizeof record) {
        code = record;
    } else {
        code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    }
    char exited[1 + 8] = {'E'}; /* wire.EXITED + EXITED_BODY ("=q") */
    memcpy(exited + 1, &code, 8);
    if (send_record(sock, exited, sizeof exited, -1))
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong((long long)code);
}

/* None or a str/bytes/PathLike path, for O&: the bytes are kept in *out (Py_None: NULL). */
static int
optional_path(PyObject *object, void *out)
{
    if (object == NULL) { /* cleanup call */
        Py_CLEAR(*(PyObject **)out);
        return 1;
    }
    if (object == Py_None) {
        *(PyObject **)out = NULL;
        return 1;
    }
    return PyUnicode_FSConverter(object, out) ? Py_CLEANUP_SUPPORTED : 0;
}

static const char *
path_bytes(PyObject *bytes)
{
    return bytes == NULL ? NULL : PyBytes_AS_STRING(bytes);
}

static PyObject *
errno_of(long result)
{
    return PyLong_FromLong(result < 0 ? errno : 0);
}

static PyObject *
sys_unshare(PyObject *self, PyObject *args)
{
    int flags;
    if (!PyArg_ParseTuple(args, "i:unshare", &flags))
        return NULL;
    return errno_of(unshare(flags));
}

static PyObject *
sys_setns(PyObject *self, PyObject *args)
{
    int fd, nstype;
    if (!PyArg_ParseTuple(args, "ii:setns", &fd, &nstype))
        return NULL;
    return errno_of(setns(fd, nstype));
}

static PyObject *
sys_mount(PyObject *self, PyObject *args)
{
    PyObject *source = NULL, *target = NULL, *fstype = NULL, *data = NULL;
    unsigned long flags;
    if (!PyArg_ParseTuple(args, "O&O&O&kO&:mount", optional_path, &source, PyUnicode_FSConverter,
                          &target, optional_path, &fstype, &flags, optional_path, &data))
        return NULL;
    long result;
    Py_BEGIN_ALLOW_THREADS /* a mount may wait on a filesystem */
    result = mount(path_bytes(source), path_bytes(target), path_bytes(fstype), flags,
                   path_bytes(data));
    Py_END_ALLOW_THREADS
    PyObject *answer = errno_of(result);
    Py_XDECREF(source);
    Py_XDECREF(target);
    Py_XDECREF(fstype);
    Py_XDECREF(data);
    return answer;
}

struct mount_attr_v0 { /* linux/mount.h, MOUNT_ATTR_SIZE_VER0 */
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static PyObject *
sys_mount_setattr(PyObject *self, PyObject *args)
{
    PyObject *path = NULL;
    unsigned long long attr_set, attr_clr;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "O&KKI:mount_setattr", PyUnicode_FSConverter, &path, &attr_set,
                          &attr_clr, &flags))
        return NULL;
    struct mount_attr_v0 attr = {.attr_set = attr_set, .attr_clr = attr_clr};
    /* 442 on every architecture (it postdates the unified numbering); glibc may lack the name */
    long result = syscall(442, -100 /* AT_FDCWD */, PyBytes_AS_STRING(path), flags, &attr,
                          sizeof attr);
    PyObject *answer = errno_of(result);
    Py_DECREF(path);
    return answer;
}

/* open_tree(2), mount_setattr(2), move_mount(2): 428, 442, 429 on every architecture (they
 * postdate the unified numbering; glibc may lack the names). */
#define SANDBOXRUN_OPEN_TREE_CLONE 1
#define SANDBOXRUN_AT_EMPTY_PATH 0x1000
#define SANDBOXRUN_AT_RECURSIVE 0x8000
#define SANDBOXRUN_MOUNT_ATTR_IDMAP 0x00100000ULL
#define SANDBOXRUN_MOVE_MOUNT_F_EMPTY_PATH 0x4
#define SANDBOXRUN_MOVE_MOUNT_T_EMPTY_PATH 0x40

static PyObject *
sys_idmapped_tree(PyObject *self, PyObject *args)
{
    /* A detached copy of the tree at source_fd (an O_PATH fd, opened without following
     * symlinks), idmapped through userns_fd: the new fd, or minus the errno. Made in the zygote
     * (the host's mount namespace, where the source is visible); PID 2 attaches it
     * (move_mount) in the task's own namespace. */
    int source_fd, userns_fd, recursive;
    if (!PyArg_ParseTuple(args, "iip:idmapped_tree", &source_fd, &userns_fd, &recursive))
        return NULL;
    unsigned int tree_flags = SANDBOXRUN_OPEN_TREE_CLONE | O_CLOEXEC | SANDBOXRUN_AT_EMPTY_PATH;
    if (recursive)
        tree_flags |= SANDBOXRUN_AT_RECURSIVE;
    int tree = (int)syscall(428, source_fd, "", tree_flags);
    if (tree < 0)
        return PyLong_FromLong(-errno);
    struct mount_attr_v0 attr = {.attr_set = SANDBOXRUN_MOUNT_ATTR_IDMAP,
                                 .userns_fd = (uint64_t)userns_fd};
    if (syscall(442, tree, "", SANDBOXRUN_AT_EMPTY_PATH |
                (recursive ? SANDBOXRUN_AT_RECURSIVE : 0), &attr, sizeof attr) < 0) {
        int saved = errno;
        close(tree);
        return PyLong_FromLong(-saved);
    }
    return PyLong_FromLong(tree);
}

static PyObject *
sys_attach_tree(PyObject *self, PyObject *args)
{
    /* move_mount(2) of a detached tree onto target_fd (O_PATH, opened without following). */
    int tree, target_fd;
    if (!PyArg_ParseTuple(args, "ii:attach_tree", &tree, &target_fd))
        return NULL;
    return errno_of(syscall(429, tree, "", target_fd, "",
                            SANDBOXRUN_MOVE_MOUNT_F_EMPTY_PATH | SANDBOXRUN_MOVE_MOUNT_T_EMPTY_PATH));
}

static PyObject *
sys_prctl(PyObject *self, PyObject *args)
{
    int option;
    unsigned long arg2 = 0, arg3 = 0;
    if (!PyArg_ParseTuple(args, "i|kk:prctl", &option, &arg2, &arg3))
        return NULL;
    return errno_of(prctl(option, arg2, arg3, 0UL, 0UL));
}

static PyObject *
sys_capset_empty(PyObject *self, PyObject *unused)
{
    /* linux/capability.h, _LINUX_CAPABILITY_VERSION_3: two 32-bit halves of each set, zeroed */
    struct { uint32_t version; int pid; } header = {0x20080522, 0};
    uint32_t data[6] = {0};
    return errno_of(syscall(SYS_capset, &header, data));
}

/* seccomp(SECCOMP_SET_MODE_FILTER, flags, program) for sandboxrun/_isolation/_seccomp.py, which
 * assembles the program (struct sock_filter[] as bytes) and sets no_new_privs first. Spelled
 * here (linux/filter.h's struct sock_fprog, linux/seccomp.h's constants) so that the build needs
 * no particular kernel headers. With SECCOMP_FILTER_FLAG_TSYNC a positive result is the thread
 * that could not be synchronised: answered as ESRCH, as SECCOMP_FILTER_FLAG_TSYNC_ESRCH would. */
struct seccomp_fprog {
    unsigned short len; /* instructions */
    const void *filter;
};

static PyObject *
sys_seccomp_load(PyObject *self, PyObject *args)
{
    Py_buffer program;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "y*I:seccomp_load", &program, &flags))
        return NULL;
    long result;
    if (program.len <= 0 || program.len % 8 != 0 || program.len / 8 > 4096 /* BPF_MAXINSNS */) {
        errno = EINVAL;
        result = -1;
    }
    else {
        struct seccomp_fprog fprog = {(unsigned short)(program.len / 8), program.buf};
#ifdef SYS_seccomp
        result = syscall(SYS_seccomp, 1 /* SECCOMP_SET_MODE_FILTER */, flags, &fprog);
#else
        errno = ENOSYS;
        result = -1;
#endif
    }
    PyBuffer_Release(&program);
    return PyLong_FromLong(result < 0 ? errno : result > 0 ? ESRCH : 0);
}

static PyMethodDef methods[] = {
    {"watch", watch, METH_VARARGS,
     "watch(sock_fd, pid, flags, status_r) -> exit code\n\n"
     "STARTED (pid, flags, PID 1's pidfd) on the socket, wait for PID 1, EXITED with PID 2's"
     " status as PID 1 reported it through status_r (else PID 1's own); raises OSError."},
    {"unshare", sys_unshare, METH_VARARGS, "unshare(flags) -> 0 or errno"},
    {"setns", sys_setns, METH_VARARGS, "setns(fd, nstype) -> 0 or errno"},
    {"mount", sys_mount, METH_VARARGS,
     "mount(source, target, fstype, flags, data) -> 0 or errno (source, fstype, data: or None)"},
    {"mount_setattr", sys_mount_setattr, METH_VARARGS,
     "mount_setattr(path, attr_set, attr_clr, flags) -> 0 or errno (flags: AT_RECURSIVE or 0)"},
    {"idmapped_tree", sys_idmapped_tree, METH_VARARGS,
     "idmapped_tree(source_fd, userns_fd, recursive) -> a detached tree's fd, or -errno"},
    {"attach_tree", sys_attach_tree, METH_VARARGS,
     "attach_tree(tree_fd, target_fd) -> 0 or errno"},
    {"prctl", sys_prctl, METH_VARARGS, "prctl(option, arg2=0, arg3=0) -> 0 or errno"},
    {"capset_empty", sys_capset_empty, METH_NOARGS,
     "capset_empty() -> 0 or errno: clear this thread's effective, permitted, inheritable sets"},
    {"seccomp_load", sys_seccomp_load, METH_VARARGS, "seccomp_load(program, flags) -> 0 or errno"},
    {"fork_reaper", (PyCFunction)(void (*)(void))fork_reaper, METH_VARARGS | METH_KEYWORDS,
     "fork_reaper(close_fds, enter_files, control_fd, wait_for_go, status_w, zygote_pidfd,"
     " helper_pidfd=-1) -> (pid, failed, errno)\n\n"
     "Fork the task's PID 1 (C only) and, from it, PID 2. Returns (PID 1's pid, 0, 0) in the"
     " caller and (0, failed, errno) in PID 2: failed is the index of the cgroup.procs file"
     " PID 1 could not enter, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sandboxrun._native",
    "The zygote's PID 1 in C (see sandboxrun/_native.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&module);
}
