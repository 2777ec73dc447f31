//! Docker's default seccomp profile, written out as data. It follows
//! moby's `profiles/seccomp/default.json` (module
//! github.com/moby/profiles/seccomp v0.2.3, vendored in moby at
//! b985e2313a86, 2026-08): default EPERM; the calls below allowed; the
//! conditional rules for `socket` (no AF_ALG, no AF_VSOCK),
//! `personality`, `clone` (no namespace flags) and `clone3` (ENOSYS, so
//! libc falls back to `clone`) without CAP_SYS_ADMIN; calls unlocked by
//! capabilities; i386 and x32 answered on x86_64 as its `archMap` says.

use crate::{ArchMap, Arg, Filter, Profile, Rule};

/// Allowed for every container.
const ALWAYS: &[&str] = &[
    "_llseek", "_newselect", "accept", "accept4", "access", "adjtimex", "alarm", "bind",
    "brk", "cachestat", "capget", "capset", "chdir", "chmod", "chown", "chown32",
    "clock_adjtime", "clock_adjtime64", "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64",
    "close", "close_range", "connect", "copy_file_range", "creat", "dup", "dup2", "dup3",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old",
    "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group", "faccessat", "faccessat2",
    "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchmodat2",
    "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr",
    "flock", "fork", "fremovexattr", "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs",
    "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futex", "futex_requeue", "futex_time64", "futex_wait",
    "futex_waitv", "futex_wake", "futimesat", "get_robust_list", "get_thread_area", "getcpu", "getcwd", "getdents",
    "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getitimer", "getpeername", "getpgid", "getpgrp", "getpid", "getppid", "getpriority",
    "getrandom", "getresgid", "getresgid32", "getresuid", "getresuid32", "getrlimit", "getrusage", "getsid",
    "getsockname", "getsockopt", "gettid", "gettimeofday", "getuid", "getuid32", "getxattr", "getxattrat",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "io_destroy", "io_getevents", "io_pgetevents",
    "io_pgetevents_time64", "io_setup", "io_submit", "ioctl", "ioprio_get", "ioprio_set", "ipc", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link", "linkat",
    "listen", "listmount", "listxattr", "listxattrat", "llistxattr", "lremovexattr", "lseek", "lsetxattr",
    "lstat", "lstat64", "madvise", "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret", "mincore",
    "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap",
    "mmap2", "mprotect", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv", "msgsnd",
    "msync", "munlock", "munlockall", "munmap", "name_to_handle_at", "nanosleep", "newfstatat", "open",
    "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv",
    "preadv2", "prlimit64", "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev", "pwritev2",
    "read", "readahead", "readlink", "readlinkat", "readv", "recv", "recvfrom", "recvmmsg",
    "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "removexattrat", "rename", "renameat", "renameat2",
    "restart_syscall", "riscv_hwprobe", "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity",
    "sched_getattr", "sched_getparam", "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr", "sched_setparam",
    "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "set_robust_list",
    "set_thread_area", "set_tid_address", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32",
    "setgroups", "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32", "setresgid",
    "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit", "setsid", "setsockopt",
    "setuid", "setuid32", "setxattr", "setxattrat", "shmat", "shmctl", "shmdt", "shmget",
    "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair",
    "splice", "stat", "stat64", "statfs", "statfs64", "statmount", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64", "timerfd_create",
    "timerfd_gettime", "timerfd_gettime64", "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64",
    "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "uretprobe", "utime", "utimensat",
    "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write",
    "writev",
];

/// Rules that hold under conditions: (names, action, errno, args as
/// (index, value, value_two, op), includes caps, includes arches, min
/// kernel, excludes caps, excludes arches).
type Cond = (&'static [&'static str], &'static str, Option<u32>, &'static [(u32, u64, u64, &'static str)], &'static [&'static str], &'static [&'static str], Option<&'static str>, &'static [&'static str], &'static [&'static str]);

const ALLOW: &str = "SCMP_ACT_ALLOW";
const NS_FLAGS: u64 = 0x7e02_0000; // CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWCGROUP

const CONDITIONAL: &[Cond] = &[
    (&["process_vm_readv", "process_vm_writev", "ptrace"], ALLOW, None, &[], &[], &[], Some("4.8"), &[], &[]),
    (&["socket"], ALLOW, None, &[(0, 38, 0, "SCMP_CMP_LT")], &[], &[], None, &[], &[]),
    (&["socket"], ALLOW, None, &[(0, 39, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["socket"], ALLOW, None, &[(0, 40, 0, "SCMP_CMP_GT")], &[], &[], None, &[], &[]),
    (&["personality"], ALLOW, None, &[(0, 0x0, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["personality"], ALLOW, None, &[(0, 0x8, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["personality"], ALLOW, None, &[(0, 0x20000, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["personality"], ALLOW, None, &[(0, 0x20008, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["personality"], ALLOW, None, &[(0, 0xffff_ffff, 0, "SCMP_CMP_EQ")], &[], &[], None, &[], &[]),
    (&["sync_file_range2", "swapcontext"], ALLOW, None, &[], &[], &["ppc64le"], None, &[], &[]),
    (&["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"], ALLOW, None, &[], &[], &["arm", "arm64"], None, &[], &[]),
    (&["arch_prctl"], ALLOW, None, &[], &[], &["amd64", "x32"], None, &[], &[]),
    (&["modify_ldt"], ALLOW, None, &[], &[], &["amd64", "x32", "x86"], None, &[], &[]),
    (&["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"], ALLOW, None, &[], &[], &["s390", "s390x"], None, &[], &[]),
    (&["riscv_flush_icache"], ALLOW, None, &[], &[], &["riscv64"], None, &[], &[]),
    (&["open_by_handle_at"], ALLOW, None, &[], &["CAP_DAC_READ_SEARCH"], &[], None, &[], &[]),
    (
        &["bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie",
          "lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr", "mount", "mount_setattr", "move_mount",
          "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname", "sethostname", "setns",
          "syslog", "umount", "umount2", "unshare"],
        ALLOW, None, &[], &["CAP_SYS_ADMIN"], &[], None, &[], &[],
    ),
    (&["clone"], ALLOW, None, &[(0, NS_FLAGS, 0, "SCMP_CMP_MASKED_EQ")], &[], &[], None, &["CAP_SYS_ADMIN"], &["s390", "s390x"]),
    (&["clone"], ALLOW, None, &[(1, NS_FLAGS, 0, "SCMP_CMP_MASKED_EQ")], &[], &["s390", "s390x"], None, &["CAP_SYS_ADMIN"], &[]),
    (&["clone3"], "SCMP_ACT_ERRNO", Some(38), &[], &[], &[], None, &["CAP_SYS_ADMIN"], &[]),
    (&["reboot"], ALLOW, None, &[], &["CAP_SYS_BOOT"], &[], None, &[], &[]),
    (&["chroot"], ALLOW, None, &[], &["CAP_SYS_CHROOT"], &[], None, &[], &[]),
    (&["delete_module", "init_module", "finit_module"], ALLOW, None, &[], &["CAP_SYS_MODULE"], &[], None, &[], &[]),
    (&["acct"], ALLOW, None, &[], &["CAP_SYS_PACCT"], &[], None, &[], &[]),
    (&["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"], ALLOW, None, &[], &["CAP_SYS_PTRACE"], &[], None, &[], &[]),
    (&["iopl", "ioperm"], ALLOW, None, &[], &["CAP_SYS_RAWIO"], &[], None, &[], &[]),
    (&["settimeofday", "stime", "clock_settime", "clock_settime64"], ALLOW, None, &[], &["CAP_SYS_TIME"], &[], None, &[], &[]),
    (&["vhangup"], ALLOW, None, &[], &["CAP_SYS_TTY_CONFIG"], &[], None, &[], &[]),
    (&["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"], ALLOW, None, &[], &["CAP_SYS_NICE"], &[], None, &[], &[]),
    (&["syslog"], ALLOW, None, &[], &["CAP_SYSLOG"], &[], None, &[], &[]),
    (&["bpf"], ALLOW, None, &[], &["CAP_BPF"], &[], None, &[], &[]),
    (&["perf_event_open"], ALLOW, None, &[], &["CAP_PERFMON"], &[], None, &[], &[]),
];

fn strings(s: &[&str]) -> Option<Vec<String>> {
    (!s.is_empty()).then(|| s.iter().map(|x| x.to_string()).collect())
}

/// Docker's default profile.
pub fn default_profile() -> Profile {
    let mut rules = vec![Rule { names: strings(ALWAYS), action: ALLOW.into(), ..Rule::default() }];
    for (names, action, errno, args, inc_caps, inc_arches, min_kernel, exc_caps, exc_arches) in CONDITIONAL {
        let filter = |caps: &[&str], arches: &[&str], k: Option<&str>| {
            (!caps.is_empty() || !arches.is_empty() || k.is_some()).then(|| Filter {
                caps: strings(caps),
                arches: strings(arches),
                min_kernel: k.map(str::to_string),
            })
        };
        rules.push(Rule {
            names: strings(names),
            action: action.to_string(),
            errno_ret: *errno,
            args: (!args.is_empty()).then(|| {
                args.iter()
                    .map(|(index, value, value_two, op)| Arg { index: *index, value: *value, value_two: *value_two, op: op.to_string() })
                    .collect()
            }),
            includes: filter(inc_caps, inc_arches, *min_kernel),
            excludes: filter(exc_caps, exc_arches, None),
            ..Rule::default()
        });
    }
    let map = |a: &str, subs: &[&str]| ArchMap { architecture: a.into(), sub_architectures: strings(subs) };
    Profile {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno_ret: Some(1),
        arch_map: Some(vec![
            map("SCMP_ARCH_X86_64", &["SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
            map("SCMP_ARCH_AARCH64", &["SCMP_ARCH_ARM"]),
        ]),
        syscalls: Some(rules),
        ..Profile::default()
    }
}
