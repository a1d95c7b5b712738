// Package listener opens the per-core SO_REUSEPORT sockets of a service and
// runs their accept loops.
//
// Usage:
//
//	lns, err := listener.ListenTCP(ctx, addr, workers)
//	for _, ln := range lns {
//		go listener.Serve(ln, handle, logger) // returns when ln is closed
//	}
//
// Each socket of a group has its own accept queue; the kernel spreads new
// connections over them by a hash of the 4-tuple, so each core accepts from
// its own queue without contending with the others.
package listener

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// ListenTCP binds n TCP sockets to addr with SO_REUSEPORT. On error none of
// them stays open. An unspecified IPv6 address ("[::]") also accepts IPv4.
func ListenTCP(ctx context.Context, addr netip.AddrPort, n int) ([]*net.TCPListener, error) {
	if n < 1 {
		return nil, fmt.Errorf("listen %s: need at least one socket, got %d", addr, n)
	}
	// KeepAlive -1: Go would otherwise set four keepalive options on every
	// accepted socket (four system calls per connection); the listening
	// socket carries them instead, and accepted sockets inherit them.
	lc := net.ListenConfig{Control: setTCPOptions, KeepAlive: -1}
	lns := make([]*net.TCPListener, 0, n)
	for range n {
		ln, err := lc.Listen(ctx, "tcp", addr.String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		lns = append(lns, ln.(*net.TCPListener))
	}
	return lns, nil
}

func setReusePort(network, address string, c syscall.RawConn) error {
	var sockErr error
	err := c.Control(func(fd uintptr) {
		sockErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	if sockErr != nil {
		return fmt.Errorf("set SO_REUSEPORT: %w", sockErr)
	}
	return nil
}

// Client keepalive, as Go's net package sets it on accepted sockets by
// default: a probe after 15 s of silence, every 15 s, 9 unanswered probes
// end the connection.
const (
	keepAliveIdle     = 15 // seconds
	keepAliveInterval = 15 // seconds
	keepAliveCount    = 9
)

// setTCPOptions sets SO_REUSEPORT and TCP keepalive on a listening socket.
// Linux copies a listener's socket options to the sockets it accepts, so
// setting keepalive here costs four system calls per listener rather than
// four per connection.
func setTCPOptions(network, address string, c syscall.RawConn) error {
	if err := setReusePort(network, address, c); err != nil {
		return err
	}
	var sockErr error
	err := c.Control(func(fd uintptr) {
		for _, o := range [...]struct {
			level, name, value int
			what               string
		}{
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle, "TCP_KEEPIDLE"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval, "TCP_KEEPINTVL"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount, "TCP_KEEPCNT"},
		} {
			if err := unix.SetsockoptInt(int(fd), o.level, o.name, o.value); err != nil {
				sockErr = fmt.Errorf("set %s: %w", o.what, err)
				return
			}
		}
	})
	if err != nil {
		return err
	}
	return sockErr
}

// Backoff bounds for accept errors. An accept that fails for lack of file
// descriptors or buffers fails again at once; retrying immediately would
// spin a core while nothing can change, so the loop sleeps, doubling from
// the first to the last bound, and resets after the next success.
const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Acceptor is the part of *net.TCPListener that Serve uses.
type Acceptor interface {
	AcceptTCP() (*net.TCPConn, error)
	Addr() net.Addr
}

var _ Acceptor = (*net.TCPListener)(nil)

// Serve accepts connections on ln and passes each to handle, which owns it
// from then on. handle runs on the accept loop and must not block: it
// starts the connection's goroutine itself, which lets it account for the
// connection before Serve can return. Serve returns nil once ln is
// closed. It never returns on other errors: the process must keep serving
// its open connections, and accept will succeed again once descriptors
// free up.
func Serve(ln Acceptor, handle func(*net.TCPConn), log hclog.Logger) error {
	return serve(ln, handle, log, time.Sleep)
}

func serve(ln Acceptor, handle func(*net.TCPConn), log hclog.Logger, sleep func(time.Duration)) error {
	var backoff time.Duration
	for {
		conn, err := ln.AcceptTCP()
		if err == nil {
			backoff = 0
			handle(conn)
			continue
		}
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if backoff == 0 {
			backoff = minAcceptBackoff
		} else {
			backoff = min(2*backoff, maxAcceptBackoff)
		}
		if isTransient(err) {
			log.Warn("accept failed, backing off", "listen", ln.Addr().String(), "error", err, "retry_in", backoff.String())
		} else {
			log.Error("accept failed unexpectedly, backing off", "listen", ln.Addr().String(), "error", err, "retry_in", backoff.String())
		}
		sleep(backoff)
	}
}

// isTransient reports the accept errors that are expected under load and
// clear up by themselves.
func isTransient(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, os.ErrDeadlineExceeded)
}
