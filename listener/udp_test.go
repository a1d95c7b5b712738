package listener

import (
	"context"
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

func TestListenUDPErrors(t *testing.T) {
	if _, err := ListenUDP(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), 0); err == nil {
		t.Error("n = 0 accepted")
	}
	// An address that is not on this host cannot be bound.
	if _, err := ListenUDP(context.Background(), netip.MustParseAddrPort("192.0.2.1:9"), 2); err == nil {
		t.Error("bound a foreign address")
	}
}
