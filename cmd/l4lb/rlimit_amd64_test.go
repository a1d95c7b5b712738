package main

import (
	"fmt"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The seccomp filter below checks for the x86-64 system call numbers: on
// other architectures this file, its test included, is not built
// (rlimit_other_test.go).

// denyRlimitChanges has the kernel refuse this process, and the processes
// it starts, any change of a resource limit (EPERM), as a seccomp policy
// or a hard limit above fs.nr_open does; the soft RLIMIT_NOFILE is first
// lowered below the hard one, so that raiseNofile tries, and fails.
func denyRlimitChanges() error {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if lim.Cur == lim.Max {
		lim.Cur = lim.Max / 2
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			return err
		}
	}
	filter := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 4}, // arch
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 1, K: unix.AUDIT_ARCH_X86_64},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0}, // system call number
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 2, K: unix.SYS_PRLIMIT64},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 1, K: unix.SYS_SETRLIMIT},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC,
		uintptr(unsafe.Pointer(&prog))); errno != 0 {
		return errno
	}
	return nil
}

// Where the soft descriptor limit cannot be raised (only a warning at
// start), the new process of an upgrade still takes over the admin
// endpoint and starts: that warning's error is not taken for the
// endpoint's.
func TestUpgradeWhereTheDescriptorLimitIsFixed(t *testing.T) {
	t.Setenv("L4LB_TEST_DENY_SETRLIMIT", "1")
	backend, _ := silentBackend(t)
	adminAddr := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path, _ := stopConfig(t, backend, adminAddr, "5s")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	run.waitLog(t, "cannot raise the soft RLIMIT_NOFILE", time.Second)
	run.upgrade(t)
	// The new process holds the log pipe: exited waits for it too.
	waitGone(t, run.cmd.Process.Pid, 10*time.Second)
	if st := adminStatus(t, adminAddr); st.Version != 1 || st.Stopping {
		t.Errorf("/status after the upgrade: %+v; want the new process's", st)
	}
}
