package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary stand in for a running l4lb: with
// L4LB_TEST_HOLD_PIDFILE set, it locks that pidfile as run does, writes
// its pid and sleeps. With L4LB_TEST_DROP_TO, it drops root for that user
// (dropTo). With L4LB_TEST_RUN, it is l4lb, given the arguments in it, one
// a line (startRun); L4LB_TEST_DENY_SETRLIMIT has the kernel refuse it any
// change of its resource limits (denyRlimitChanges).
func TestMain(m *testing.M) {
	if name := os.Getenv("L4LB_TEST_DROP_TO"); name != "" {
		os.Exit(dropTo(name))
	}
	if os.Getenv("L4LB_TEST_DENY_SETRLIMIT") != "" {
		if err := denyRlimitChanges(); err != nil {
			os.Stderr.WriteString("L4LB_TEST_DENY_SETRLIMIT: " + err.Error() + "\n")
			os.Exit(3)
		}
	}
	if args := os.Getenv("L4LB_TEST_RUN"); args != "" {
		os.Exit(runMain(strings.Split(args, "\n"), os.Stdout, os.Stderr))
	}
	if path := os.Getenv("L4LB_TEST_HOLD_PIDFILE"); path != "" {
		f, err := lockPidfile(path)
		if err == nil {
			err = writePid(f)
		}
		if err != nil {
			os.Exit(3)
		}
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// A running l4lb's pidfile is refused to a second one, whatever either
// binary is called, and free again once the first exits; a stale file
// left by a dead one is taken over.
func TestPidfileLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.pid")
	holder := startPidfileHolder(t, path)
	want := strconv.Itoa(holder.Process.Pid)
	_, err := lockPidfile(path)
	var held *pidfileHeldError
	if !errors.As(err, &held) || held.pid != want {
		t.Fatalf("locking a pidfile l4lb pid %s holds: %v; want it refused, naming that pid", want, err)
	}
	if !strings.Contains(err.Error(), "l4lb pid "+want+" holds "+path) {
		t.Errorf("message %q does not name the holder", err)
	}

	holder.Process.Kill()
	holder.Wait()
	f, err := lockPidfile(path) // the file is still there, stale
	if err != nil {
		t.Fatalf("the holder exited, yet: %v", err)
	}
	defer f.Close()
	if b, _ := os.ReadFile(path); len(b) != 0 {
		t.Errorf("a taken-over pidfile still says %q before the pid is written", b)
	}
	if err := writePid(f); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Errorf("pidfile says %q, want %d", b, os.Getpid())
	}
	// Two starting at once: the second finds the first's lock before
	// either has written its pid.
	if _, err := lockPidfile(path); !errors.As(err, &held) {
		t.Errorf("a second lock of a held pidfile: %v; want it refused", err)
	}
}

// startPidfileHolder starts this test binary as a stand-in for a running
// l4lb that holds the pidfile at path (see TestMain), and returns once the
// pidfile names it. The holder is killed at the end of the test.
func startPidfileHolder(t *testing.T, path string) *exec.Cmd {
	t.Helper()
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), "L4LB_TEST_HOLD_PIDFILE="+path)
	// The holder must die of SIGHUP, as it does by default, even when the
	// tests run under nohup: a child inherits an ignored signal, but one
	// the Go runtime handles goes back to its default action in the child.
	// So SIGHUP is handled while the holder starts.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	err := holder.Start()
	signal.Stop(hup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	want := strconv.Itoa(holder.Process.Pid)
	// The pid is written after the lock is taken: polled, since the holder
	// has no other way to say it is ready.
	for i := 0; ; i++ {
		if b, _ := os.ReadFile(path); strings.TrimSpace(string(b)) == want {
			return holder
		}
		if i == 500 {
			t.Fatal("the holder never wrote its pid")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// l4lb reload -pidfile signals the l4lb that holds the pidfile's lock,
// and nothing when no l4lb holds it: a pidfile left behind (a crash,
// SIGKILL, or a [process] user that cannot remove it from /run) names a
// process id that may now be another program's.
func TestReloadPidfileSignalsOnlyAHolder(t *testing.T) {
	dir := t.TempDir()

	// Stale: the pidfile names a live process that holds no lock.
	other := exec.Command("sleep", "30")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill() })
	otherDone := make(chan error, 1)
	go func() { otherDone <- other.Wait() }()
	stale := filepath.Join(dir, "stale.pid")
	if err := os.WriteFile(stale, []byte(strconv.Itoa(other.Process.Pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	code := runMain([]string{"reload", "-pidfile", stale}, &out, &out)
	if code != 1 || !strings.Contains(out.String(), stale+" is stale: no l4lb holds it") {
		t.Errorf("stale pidfile: exit %d, output %q; want exit 1, saying it is stale", code, out.String())
	}

	// Held: the holder gets the SIGHUP, which ends it (it does not catch
	// it), even when the tests run under nohup, as here from now on: this
	// process ignores SIGHUP. (os/signal cannot take that back; no other
	// test minds, as l4lb run handles SIGHUP whatever it inherits.)
	signal.Ignore(syscall.SIGHUP)
	held := filepath.Join(dir, "held.pid")
	holder := startPidfileHolder(t, held)
	out.Reset()
	if code := runMain([]string{"reload", "-pidfile", held}, &out, &out); code != 0 || !strings.Contains(out.String(), "SIGHUP sent") {
		t.Errorf("held pidfile: exit %d, output %q; want exit 0", code, out.String())
	}
	var exit *exec.ExitError
	if err := holder.Wait(); !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGHUP {
		t.Errorf("the holder ended with %v, want SIGHUP", err)
	}

	// By now the stale pidfile's process has had time to die of a signal
	// sent in error.
	select {
	case err := <-otherDone:
		t.Errorf("the process a stale pidfile names was signalled: %v", err)
	default:
	}
}
