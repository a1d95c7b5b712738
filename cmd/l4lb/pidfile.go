package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// lockPidfile opens the pidfile at path and takes an exclusive lock on it,
// held by the returned file for the life of the process: SO_REUSEPORT lets
// a second l4lb bind the same addresses, and the kernel would split the
// clients between the two. A lock, unlike a process id read back from the
// file, finds the other l4lb whatever its binary is called, is released
// when it exits (a zombie holds none), and cannot be taken by two starting
// at once. The file is emptied until writePid fills it, so that `l4lb
// reload -pidfile` during start-up finds no number rather than a stale
// one.
func lockPidfile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		content, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, &pidfileHeldError{path: path, pid: strings.TrimSpace(string(content))}
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// writePid writes this process's id into the locked pidfile f, in place
// of what is there.
func writePid(f *os.File) error { return writePidOf(f, os.Getpid()) }

// writePidOf writes pid into the locked pidfile f, in place of what is
// there: an upgrade writes the new process's.
func writePidOf(f *os.File, pid int) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(strconv.Itoa(pid)+"\n"), 0)
	return err
}

// pidfileHeldError says another l4lb holds the pidfile's lock.
type pidfileHeldError struct{ path, pid string }

func (e *pidfileHeldError) Error() string {
	who := "another l4lb, still starting,"
	if e.pid != "" {
		who = "l4lb pid " + e.pid
	}
	return fmt.Sprintf("%s holds %s: two would split the clients between them; stop it first, or reload it with l4lb reload -pidfile %s", who, e.path, e.path)
}
