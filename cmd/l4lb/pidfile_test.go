package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary stand in for a running l4lb: with
// L4LB_TEST_HOLD_PIDFILE set, it locks that pidfile as run does, writes
// its pid and sleeps.
func TestMain(m *testing.M) {
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
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), "L4LB_TEST_HOLD_PIDFILE="+path)
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	want := strconv.Itoa(holder.Process.Pid)
	for i := 0; ; i++ {
		if b, _ := os.ReadFile(path); strings.TrimSpace(string(b)) == want {
			break
		}
		if i == 500 {
			t.Fatal("the holder never wrote its pid")
		}
		time.Sleep(10 * time.Millisecond)
	}
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
