package l4

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

// A binary upgrade (cmd/l4lb, SIGUSR2) starts the new l4lb with the
// running one's listening sockets, the same sockets and not new ones bound
// beside them: a SO_REUSEPORT socket that closes resets the clients queued
// on it, and a new socket joining a group re-hashes the clients over it.
// Both processes accept from the shared sockets until the new one is
// ready; then the old one stops accepting and drains its connections. The
// kernel keeps each socket, and its queue, for as long as either process
// holds it.

// ListenSocket is a listening socket of a service, passed from one l4lb
// process to the next.
type ListenSocket struct {
	Protocol config.Protocol
	// Listen is the socket's bound address, as the config names it.
	Listen netip.AddrPort
	FD     int
}

// ListenSockets returns a duplicate of each listening socket of the
// running services (close-on-exec, for the caller to pass on and then
// close), sorted by protocol and address. Services a reload removed and
// that still drain are left out: no later config of theirs may serve
// from them.
func (srv *Server) ListenSockets() ([]ListenSocket, error) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		return nil, errors.New("l4lb is stopping")
	}
	var out []ListenSocket
	add := func(key socketKey, fd int) error {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("duplicate the socket of %s %s: %w", key.protocol, key.listen, err)
		}
		out = append(out, ListenSocket{Protocol: key.protocol, Listen: key.listen, FD: dup})
		return nil
	}
	for key, rs := range srv.running {
		var err error
		if rs.udp != nil {
			for _, w := range rs.udp.workers {
				if ctlErr := w.rc.Control(func(fd uintptr) { err = add(key, int(fd)) }); ctlErr != nil {
					err = ctlErr
				}
				if err != nil {
					break
				}
			}
		} else {
			// mu keeps every socket of rs.listeners open: only Apply,
			// retire and Shutdown (once closed is set) close them.
			for _, a := range rs.listeners {
				if err = add(key, a.listenFD); err != nil {
					break
				}
			}
		}
		if err != nil {
			CloseListenSockets(out)
			return nil, err
		}
	}
	slices.SortStableFunc(out, func(a, b ListenSocket) int {
		return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), a.Listen.Compare(b.Listen))
	})
	return out, nil
}

// CloseListenSockets closes the descriptors of socks.
func CloseListenSockets(socks []ListenSocket) {
	for _, s := range socks {
		unix.Close(s.FD)
	}
}

// InheritedSocket describes the listening socket fd inherited from the
// l4lb this one takes over from, from the socket itself: a TCP socket
// that listens, or a bound UDP socket.
func InheritedSocket(fd int) (ListenSocket, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return ListenSocket{}, fmt.Errorf("descriptor %d: not a socket: %w", fd, err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return ListenSocket{}, fmt.Errorf("descriptor %d: getsockname: %w", fd, err)
	}
	addr, zoneID, ok := sockaddrAddrPort(sa)
	if !ok {
		return ListenSocket{}, fmt.Errorf("descriptor %d: not an IP socket", fd)
	}
	if zoneID != 0 {
		// The config names the zone (fe80::1%eth0): so must the key.
		if ifi, err := net.InterfaceByIndex(int(zoneID)); err == nil {
			addr = netip.AddrPortFrom(addr.Addr().WithZone(ifi.Name), addr.Port())
		}
	}
	switch typ {
	case unix.SOCK_STREAM:
		if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on == 0 {
			return ListenSocket{}, fmt.Errorf("descriptor %d: a TCP socket that does not listen", fd)
		}
		return ListenSocket{Protocol: config.TCP, Listen: addr, FD: fd}, nil
	case unix.SOCK_DGRAM:
		return ListenSocket{Protocol: config.UDP, Listen: addr, FD: fd}, nil
	}
	return ListenSocket{}, fmt.Errorf("descriptor %d: socket type %d, neither TCP nor UDP", fd, typ)
}

// Adopt gives the server the listening sockets inherited from the l4lb
// it takes over from. The first Apply serves each service from those of
// its protocol and address, all of them (a group keeps its size, as a
// reload keeps it), binding only what its workers want beyond them; it
// closes the sockets no service wants. Call it before the first Apply.
func (srv *Server) Adopt(socks []ListenSocket) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.inherited = make(map[socketKey][]int)
	for _, s := range socks {
		key := socketKey{s.Protocol, s.Listen}
		srv.inherited[key] = append(srv.inherited[key], s.FD)
	}
}

// adoptTCP takes the inherited sockets of key for the event loops, with
// the user that bound them (the kernel adds sockets to a SO_REUSEPORT
// group only for that user); mu is held.
func (srv *Server) adoptTCP(key socketKey) (socks []boundSocket, uid int) {
	fds := srv.inherited[key]
	delete(srv.inherited, key)
	for _, fd := range fds {
		socks = append(socks, boundSocket{fd: fd, addr: key.listen})
	}
	uid = srv.geteuid()
	var st unix.Stat_t
	if len(fds) > 0 && unix.Fstat(fds[0], &st) == nil {
		uid = int(st.Uid)
	}
	return socks, uid
}

// adoptUDP takes the inherited sockets of key as the service's group;
// mu is held.
func (srv *Server) adoptUDP(key socketKey) ([]*net.UDPConn, error) {
	fds := srv.inherited[key]
	delete(srv.inherited, key)
	var conns []*net.UDPConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "udp "+key.listen.String())
		pc, err := net.FilePacketConn(f) // a duplicate, on Go's netpoller
		f.Close()
		if err == nil {
			if c, ok := pc.(*net.UDPConn); ok {
				conns = append(conns, c)
				continue
			}
			pc.Close()
			err = errors.New("not a UDP socket")
		}
		for _, c := range conns {
			c.Close()
		}
		for _, fd := range fds[i+1:] {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("inherited socket of udp %s: %w", key.listen, err)
	}
	return conns, nil
}

// closeInherited closes the inherited sockets no service took; mu is
// held. The l4lb that passed them still serves from its copies until it
// stops.
func (srv *Server) closeInherited() {
	for key, fds := range srv.inherited {
		srv.log.Info("inherited listening sockets closed: no service of the config listens there",
			"protocol", key.protocol, "listen", key.listen, "sockets", len(fds))
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	srv.inherited = nil
}
