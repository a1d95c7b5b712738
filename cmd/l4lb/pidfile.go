package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// pidfileOwner returns the process the pidfile at path names, when that
// process is alive and runs the same program as this one. A stale file,
// or one whose number now belongs to another program, names no owner.
func pidfileOwner(path string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return 0, false
	}
	// /proc/N exists for thread ids too: only a thread group leader is a
	// process a pidfile can name.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil || !strings.Contains(string(status), fmt.Sprintf("\nTgid:\t%d\n", pid)) {
		return 0, false
	}
	theirs, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return 0, false
	}
	ours, err := os.ReadFile("/proc/self/comm")
	return pid, err == nil && string(theirs) == string(ours)
}
