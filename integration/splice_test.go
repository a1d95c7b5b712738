package integration

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSplicePath proves that bulk bytes move with splice(2): strace
// follows l4lb while 8 MiB go each way through it, and the bytes that
// splice calls report must account for nearly all of them (each spliced
// byte is spliced twice: socket to pipe, pipe to socket). Not all: the
// data path reads small chunks into a buffer and switches to splice once a
// read fills it (l4/copy.go), so the start of each burst is copied.
func TestSplicePath(t *testing.T) {
	const size = 8 << 20
	top := newTopology(t, 1, 1, 1)
	l := startLB(t, top.LB, configTOML(echoService(t, top, "echo", echoPort, false, echo)))

	trace := filepath.Join(t.TempDir(), "strace.out")
	pid := strconv.Itoa(l.cmd.Process.Pid)
	strace, err := startProcess(t, top.LB, "stderr", "attached",
		"strace", "-f", "-e", "trace=splice", "-e", "signal=none", "-o", trace, "-p", pid)
	if strace == nil || err != nil {
		t.Fatalf("start strace: %v", err)
	}
	// strace prints "Process N attached with M threads" once it has seized
	// every thread, which startProcess waited for: no sleep needed.

	c := top.Clients[0]
	conn, err := dialFrom(c.NS, c.Addrs4[0], netip.AddrPortFrom(vip4, echoPort))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := echoRoundTrip(conn, size, 7); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	strace.Signal(t, syscall.SIGINT)
	if strace.WaitExit(10*time.Second) == nil {
		t.Fatal("strace did not exit after SIGINT")
	}

	out, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	calls, spliced := 0, int64(0)
	// With -f, a call interrupted by another thread's shows as
	// "splice(... <unfinished ...>" then "<... splice resumed>) = N": take
	// the result of every splice line that has one.
	for _, line := range strings.Split(string(out), "\n") {
		i := strings.LastIndex(line, "= ")
		if !strings.Contains(line, "splice") || i < 0 {
			continue
		}
		if n, err := strconv.ParseInt(strings.TrimSpace(line[i+2:]), 10, 64); err == nil {
			calls++
			spliced += n
		}
	}
	t.Logf("%d splice calls moved %d bytes for %d bytes proxied each way", calls, spliced, size)
	// 2 directions x 2 splices per byte, for at least 90% of the bytes.
	if want := int64(4 * size * 9 / 10); spliced < want {
		t.Errorf("splice moved %d bytes, want at least %d (90%% of the bulk bytes): the data path did not splice the bulk transfer", spliced, want)
	}
}
