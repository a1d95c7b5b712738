package listener

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestListenUDPGroup binds four sockets to one port and checks that each
// client address keeps reaching the same socket, and that clients spread
// over more than one.
func TestListenUDPGroup(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			ip := netip.MustParseAddr(host)
			first, err := ListenUDP(context.Background(), netip.AddrPortFrom(ip, 0), 1)
			if err != nil {
				t.Fatal(err)
			}
			addr := first[0].LocalAddr().(*net.UDPAddr).AddrPort()
			conns, err := ListenUDP(context.Background(), addr, 3)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, first...)
			t.Cleanup(func() {
				for _, c := range conns {
					c.Close()
				}
			})

			// which returns the index of the socket that got the
			// datagram from client.
			which := func(client *net.UDPConn) int {
				t.Helper()
				for _, c := range conns {
					c.SetReadDeadline(time.Now().Add(2 * time.Second))
				}
				if _, err := client.Write([]byte("x")); err != nil {
					t.Fatal(err)
				}
				got := make(chan int, len(conns))
				for i, c := range conns {
					go func() {
						buf := make([]byte, 16)
						if _, _, err := c.ReadFromUDPAddrPort(buf); err == nil {
							got <- i
						} else {
							got <- -1
						}
					}()
				}
				idx := -1
				for range conns {
					if i := <-got; i >= 0 {
						idx = i
						// Unblock the other readers at once.
						for _, c := range conns {
							c.SetReadDeadline(time.Now())
						}
					}
				}
				if idx < 0 {
					t.Fatal("no socket of the group received the datagram")
				}
				return idx
			}

			used := map[int]bool{}
			for range 16 {
				client, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
				if err != nil {
					t.Fatal(err)
				}
				a, b := which(client), which(client)
				client.Close()
				if a != b {
					t.Errorf("one client reached sockets %d and %d; want the same", a, b)
				}
				used[a] = true
			}
			if len(used) < 2 {
				t.Errorf("16 clients all reached socket %v; want a spread", used)
			}
		})
	}
}

// TestListenUDPWildcardFamilies checks which clients each wildcard
// receives from: 0.0.0.0 only IPv4 ones, [::] both families. 0.0.0.0 must
// also read back as an IPv4 address: the PROXY v2 header of a flow takes
// its family from it.
func TestListenUDPWildcardFamilies(t *testing.T) {
	for _, tt := range []struct {
		listen, bound string
		ipv6Clients   bool
	}{
		{listen: "0.0.0.0", bound: "0.0.0.0", ipv6Clients: false},
		{listen: "::", bound: "::", ipv6Clients: true},
	} {
		t.Run(tt.listen, func(t *testing.T) {
			conns, err := ListenUDP(context.Background(), netip.AddrPortFrom(netip.MustParseAddr(tt.listen), 0), 1)
			if err != nil {
				t.Fatal(err)
			}
			ln := conns[0]
			defer ln.Close()
			bound := ln.LocalAddr().(*net.UDPAddr).AddrPort()
			if bound.Addr().String() != tt.bound {
				t.Errorf("bound %s, want %s", bound, tt.bound)
			}
			for _, client := range []struct {
				host string
				want bool
			}{{"127.0.0.1", true}, {"::1", tt.ipv6Clients}} {
				c, err := net.Dial("udp", net.JoinHostPort(client.host, fmt.Sprint(bound.Port())))
				if err != nil {
					t.Fatal(err)
				}
				c.Write([]byte(client.host))
				c.Close()
				// Loopback delivers at once: a datagram not there within
				// 300 ms did not come.
				ln.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				buf := make([]byte, 64)
				n, _, err := ln.ReadFromUDPAddrPort(buf)
				if got := err == nil && string(buf[:n]) == client.host; got != client.want {
					t.Errorf("a datagram from %s arrived: %v, want %v", client.host, got, client.want)
				}
			}
		})
	}
}

func TestListenUDPErrors(t *testing.T) {
	if _, err := ListenUDP(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), 0); err == nil {
		t.Error("n = 0 accepted")
	}
	// An address that is not on this host cannot be bound.
	if _, err := ListenUDP(context.Background(), netip.MustParseAddrPort("192.0.2.1:9"), 2); err == nil {
		t.Error("bound a foreign address")
	}
}
