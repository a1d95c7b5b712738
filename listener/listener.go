// Package listener opens the per-core SO_REUSEPORT sockets of a service and
// accepts from them.
//
// Usage:
//
//	lns, err := listener.ListenTCP(ctx, addr, workers)
//	fd, err := listener.Detach(lns[0]) // for an epoll set of one's own
//	conn, err := listener.Accept(fd, &sa) // when fd is readable
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
	"unsafe"

	"golang.org/x/sys/unix"
)

// ListenTCP binds n TCP sockets to addr with SO_REUSEPORT. On error none of
// them stays open. "0.0.0.0" accepts IPv4 clients only; "[::]" accepts
// IPv6 and IPv4 clients (see network).
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
		ln, err := lc.Listen(ctx, Network("tcp", addr), addr.String())
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

// Network is the network to bind addr with, for proto "tcp" or "udp". An
// IPv4 address, 0.0.0.0 included, gets an IPv4 socket ("tcp4", "udp4"),
// which IPv6 clients cannot reach: 0.0.0.0 means every IPv4 address, as in
// HAProxy and nginx. Go would open "tcp" on 0.0.0.0 as a dual-stack IPv6
// socket on [::], exposing the service over IPv6 too, and a UDP service's
// local address would then read [::] (its PROXY v2 headers would go out
// as IPv6). An IPv6 address keeps plain "tcp"/"udp", so that [::] stays
// dual-stack: Go turns IPV6_V6ONLY off on it whatever
// net.ipv6.bindv6only says.
func Network(proto string, addr netip.AddrPort) string {
	if addr.Addr().Is4() {
		return proto + "4"
	}
	return proto
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

// setTCPOptions sets SO_REUSEPORT, TCP_NODELAY and TCP keepalive on a
// listening socket.
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
			// Accepted sockets inherit TCP_NODELAY too: requests and
			// replies leave at once, at no system call per connection.
			{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1, "TCP_NODELAY"},
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

// Conn is an accepted connection as a raw descriptor: non-blocking,
// close-on-exec, and on no poller, so that the data plane puts it in an
// epoll set of its own (l4's event loops) at no extra system call. Peer is
// the client's address, IPv4-mapped addresses unmapped.
type Conn struct {
	FD   int
	Peer netip.AddrPort
}

// Detach takes ln's socket out of Go's net package: it returns a
// descriptor of its own for the socket (a dup, non-blocking like ln's)
// and closes ln, which takes ln off Go's netpoller; the socket stays
// bound and listening. l4's event loops accept from it with Accept.
func Detach(ln *net.TCPListener) (int, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		return -1, err
	}
	dup := -1
	var dupErr error
	if err := rc.Control(func(fd uintptr) { dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if dupErr != nil {
		return -1, fmt.Errorf("listen %s: dup: %w", ln.Addr(), dupErr)
	}
	ln.Close()
	return dup, nil
}

// Accept accepts one connection from the non-blocking listening socket fd
// with accept4(2), into sa. net's Accept would cost more per connection
// than the data plane needs: a getsockname, a getpeername, an epoll_ctl
// and a TCP_NODELAY setsockopt (the listener carries TCP_NODELAY instead,
// see setTCPOptions). It returns the raw errno on failure: EAGAIN when no
// connection waits.
func Accept(fd int, sa *unix.RawSockaddrAny) (Conn, error) {
	size := uint32(unix.SizeofSockaddrAny)
	// A RawSyscall: the socket is non-blocking, so the call never waits,
	// and the scheduler need not know about it (see l4's rawRead).
	nfd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(sa)), uintptr(unsafe.Pointer(&size)),
		unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if errno != 0 {
		return Conn{FD: -1}, errno
	}
	return Conn{FD: int(nfd), Peer: addrPortOf(sa)}, nil
}

// addrPortOf converts a peer address as accept4 filled it in.
func addrPortOf(sa *unix.RawSockaddrAny) netip.AddrPort {
	switch sa.Addr.Family {
	case unix.AF_INET:
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), ntohs(in.Port))
	case unix.AF_INET6:
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom16(in.Addr).Unmap(), ntohs(in.Port))
	}
	return netip.AddrPort{}
}

// ntohs reads a port as the kernel stores it, in network byte order.
func ntohs(port uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&port))
	return uint16(b[0])<<8 | uint16(b[1])
}

// Backoff paces retries of a failing accept. An accept that fails for
// lack of file descriptors or buffers fails again at once; retrying
// immediately would spin a core while nothing can change, so the waits
// double from the first to the last bound, and Reset starts over after
// the next success.
type Backoff struct{ wait time.Duration }

const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Next returns how long to wait before the next attempt.
func (b *Backoff) Next() time.Duration {
	if b.wait == 0 {
		b.wait = minAcceptBackoff
	} else {
		b.wait = min(2*b.wait, maxAcceptBackoff)
	}
	return b.wait
}

// Reset is called after a success.
func (b *Backoff) Reset() { b.wait = 0 }

// IsTransient reports the accept errors that are expected under load and
// clear up by themselves.
func IsTransient(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, os.ErrDeadlineExceeded)
}
