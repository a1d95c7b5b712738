package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// TestMain lets the test binary stand in for a running l4lb: with
// L4LB_TEST_SLEEP set it only sleeps, as the same program as the tests.
func TestMain(m *testing.M) {
	if os.Getenv("L4LB_TEST_SLEEP") == "1" {
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestPidfileOwner(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	twin := exec.Command(os.Args[0])
	twin.Env = append(os.Environ(), "L4LB_TEST_SLEEP=1")
	if err := twin.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { twin.Process.Kill(); twin.Wait() })
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill(); other.Wait() })
	for _, c := range []struct {
		name, content string
		owned         bool
	}{
		{"running", strconv.Itoa(twin.Process.Pid) + "\n", true},
		{"other program", strconv.Itoa(other.Process.Pid) + "\n", false},
		{"ours", strconv.Itoa(os.Getpid()), false},
		{"dead", "4194305", false}, // past the kernel's largest pid_max
		{"garbage", "l4lb\n", false},
	} {
		pid, owned := pidfileOwner(write(c.name, c.content))
		if owned != c.owned {
			t.Errorf("%s: pidfileOwner = %d, %v; want owned %v", c.name, pid, owned, c.owned)
		}
	}
	if _, owned := pidfileOwner(filepath.Join(dir, "missing")); owned {
		t.Error("a missing pidfile has an owner")
	}
}

// A stale pidfile whose number is now a thread of this very process (Go
// starts several before main) names no other l4lb.
func TestPidfileOwnerIgnoresThreads(t *testing.T) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	tid := 0
	for _, e := range tasks {
		if n, _ := strconv.Atoi(e.Name()); n != os.Getpid() {
			tid = n
			break
		}
	}
	if tid == 0 {
		t.Fatal("the test binary runs one thread: no thread id to test with")
	}
	p := filepath.Join(t.TempDir(), "l4lb.pid")
	if err := os.WriteFile(p, []byte(strconv.Itoa(tid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if pid, owned := pidfileOwner(p); owned {
		t.Errorf("pidfile naming thread %d of this process (pid %d): pidfileOwner = %d, true; want no owner", tid, os.Getpid(), pid)
	}
}
