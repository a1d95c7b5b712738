package listener

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// ListenUDP binds n UDP sockets to addr with SO_REUSEPORT, one per worker.
// On error none of them stays open. As with ListenTCP, "0.0.0.0" receives
// IPv4 datagrams only and "[::]" both families.
//
// The kernel picks the socket of a group for each datagram by a hash of its
// 4-tuple, so all datagrams of one client address:port reach the same
// socket, and so the same worker and flow table, as long as the group keeps
// its size: adding or closing a socket re-hashes most clients onto other
// sockets. Callers that keep per-socket state should therefore keep the
// group as it is for the life of the service.
func ListenUDP(ctx context.Context, addr netip.AddrPort, n int) ([]*net.UDPConn, error) {
	if n < 1 {
		return nil, fmt.Errorf("listen udp %s: need at least one socket, got %d", addr, n)
	}
	lc := net.ListenConfig{Control: setReusePort}
	conns := make([]*net.UDPConn, 0, n)
	for range n {
		c, err := lc.ListenPacket(ctx, Network("udp", addr), addr.String())
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, fmt.Errorf("listen udp %s: %w", addr, err)
		}
		conns = append(conns, c.(*net.UDPConn))
	}
	return conns, nil
}
