package main

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// notifier tells systemd about the service's state (sd_notify): READY=1
// once the listeners are bound, RELOADING=1 and READY=1 around reloads (for
// Type=notify-reload), STOPPING=1 at shutdown. The protocol is one datagram
// per message to the unix socket named by $NOTIFY_SOCKET, so no library is
// needed. Without $NOTIFY_SOCKET every call does nothing. Once STOPPING=1
// is sent, READY=1 and RELOADING=1 are not: a reload that was under way
// when the stop began must not tell systemd the service is ready again.
type notifier struct {
	addr *net.UnixAddr

	mu      sync.Mutex // held while a message is sent: they go in order
	stopped bool       // STOPPING=1 was sent
}

func newNotifier() *notifier {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return &notifier{}
	}
	if strings.HasPrefix(name, "@") {
		name = "\x00" + name[1:] // abstract socket
	}
	return &notifier{addr: &net.UnixAddr{Name: name, Net: "unixgram"}}
}

// send delivers one message of newline-separated KEY=VALUE lines.
func (n *notifier) send(lines ...string) error {
	if n.addr == nil {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

func (n *notifier) ready(status string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return nil
	}
	return n.send("READY=1", "STATUS="+status)
}

// readyAsMain is ready from the process an upgrade started: systemd
// takes it as the service's main process (the unit needs NotifyAccess=all
// to hear it), before the one that started it exits.
func (n *notifier) readyAsMain(status string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.send(fmt.Sprintf("MAINPID=%d", os.Getpid()), "READY=1", "STATUS="+status)
}

// handOverMain names pid, an upgrade's new process, the service's main
// process, and sends nothing more: that process speaks for it now.
func (n *notifier) handOverMain(pid int, status string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopped = true
	return n.send(fmt.Sprintf("MAINPID=%d", pid), "READY=1", "STATUS="+status)
}

// quiet sends nothing more, as after stopping: an upgrade's new process
// is systemd's main process now, and speaks for the service.
func (n *notifier) quiet() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopped = true
}

// reloading must carry CLOCK_MONOTONIC in microseconds: systemd uses it
// to tell this reload from an earlier one.
func (n *notifier) reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	usec := ts.Sec*1_000_000 + ts.Nsec/1000
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return nil
	}
	return n.send("RELOADING=1", fmt.Sprintf("MONOTONIC_USEC=%d", usec), "STATUS=reloading")
}

func (n *notifier) stopping() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopped = true
	return n.send("STOPPING=1", "STATUS=draining connections")
}
