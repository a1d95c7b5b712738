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
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

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

// Backoff bounds for accept errors. An accept that fails for lack of file
// descriptors or buffers fails again at once; retrying immediately would
// spin a core while nothing can change, so the loop sleeps, doubling from
// the first to the last bound, and resets after the next success.
const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Conn is an accepted connection as a raw descriptor: non-blocking,
// close-on-exec, and not registered with Go's netpoller, so that the data
// plane can put it in an epoll set of its own (l4's event loops) at no
// extra system call. Peer is the client's address, IPv4-mapped addresses
// unmapped.
type Conn struct {
	FD   int
	Peer netip.AddrPort
}

// Acceptor is a listening socket Serve takes connections from.
type Acceptor interface {
	AcceptRaw() (Conn, error)
	Addr() net.Addr
}

// RawListener accepts with accept4(2) directly, parking on Go's netpoller
// between connections. net's Accept would cost more per connection than
// the data plane needs: a getsockname, a getpeername, an epoll_ctl and a
// TCP_NODELAY setsockopt (the listener carries TCP_NODELAY instead, see
// setTCPOptions).
type RawListener struct {
	file *os.File
	rc   syscall.RawConn
	addr net.Addr
	// closed tells AcceptRaw's error apart: os.File's RawConn reports a
	// close as internal/poll's ErrFileClosing, which no exported error
	// matches.
	closed atomic.Bool
	// accept is built once, so that accepting allocates nothing for it.
	accept func(fd uintptr) bool
	// Results of the last accept callback.
	conn Conn
	err  error
	sa   unix.RawSockaddrAny
}

// Raw takes over ln's socket for AcceptRaw; ln is closed, the socket
// stays bound. net's listeners refuse RawConn.Read, so the socket moves to
// an *os.File of its own (a dup, then ln's descriptor is closed), whose
// RawConn parks on the netpoller like any other. Only one goroutine may
// accept from the result.
func Raw(ln *net.TCPListener) (*RawListener, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup := -1
	var dupErr error
	if err := rc.Control(func(fd uintptr) { dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, fmt.Errorf("listen %s: dup: %w", ln.Addr(), dupErr)
	}
	addr := ln.Addr()
	ln.Close()
	// The dup shares the file status flags: it is non-blocking already,
	// so os.NewFile registers it with the netpoller.
	file := os.NewFile(uintptr(dup), "tcp-listener")
	frc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, err
	}
	l := &RawListener{file: file, rc: frc, addr: addr}
	l.accept = l.acceptFD
	return l, nil
}

// RawAll is Raw for each of lns; on error all of lns are closed.
func RawAll(lns []*net.TCPListener) ([]*RawListener, error) {
	out := make([]*RawListener, 0, len(lns))
	for i, ln := range lns {
		r, err := Raw(ln)
		if err != nil {
			for _, l := range out {
				l.Close()
			}
			for _, l := range lns[i+1:] {
				l.Close()
			}
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// Addr is the address the socket is bound to.
func (l *RawListener) Addr() net.Addr { return l.addr }

// Close closes the socket and wakes a goroutine in AcceptRaw.
func (l *RawListener) Close() error {
	l.closed.Store(true)
	return l.file.Close()
}

// Control runs f with the listening socket's descriptor.
func (l *RawListener) Control(f func(fd uintptr)) error { return l.rc.Control(f) }

// AcceptRaw waits for the next connection. It returns an error wrapping
// net.ErrClosed once the listener is closed.
func (l *RawListener) AcceptRaw() (Conn, error) {
	if err := l.rc.Read(l.accept); err != nil {
		if l.closed.Load() {
			err = fmt.Errorf("accept on %s: %w", l.addr, net.ErrClosed)
		}
		return Conn{}, err
	}
	if l.err != nil {
		return Conn{}, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: os.NewSyscallError("accept4", l.err)}
	}
	return l.conn, nil
}

func (l *RawListener) acceptFD(fd uintptr) bool {
	for {
		size := uint32(unix.SizeofSockaddrAny)
		nfd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, fd, uintptr(unsafe.Pointer(&l.sa)), uintptr(unsafe.Pointer(&size)),
			unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		switch errno {
		case 0:
			l.conn, l.err = Conn{FD: int(nfd), Peer: addrPortOf(&l.sa)}, nil
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		l.err = errno
		return true
	}
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

// Serve accepts connections on ln and passes each to handle, which owns it
// from then on. handle runs on the accept loop and must not block: it
// hands the connection on itself, which lets it account for the
// connection before Serve can return. Serve returns nil once ln is
// closed. It never returns on other errors: the process must keep serving
// its open connections, and accept will succeed again once descriptors
// free up.
func Serve(ln Acceptor, handle func(Conn), log hclog.Logger) error {
	return serve(ln, handle, log, time.Sleep)
}

func serve(ln Acceptor, handle func(Conn), log hclog.Logger, sleep func(time.Duration)) error {
	var backoff time.Duration
	for {
		conn, err := ln.AcceptRaw()
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
