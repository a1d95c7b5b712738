package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// echoPort is where the Go backends listen and l4lb's echo services too.
const echoPort = 7000

// echoService starts an echo backend on port in every backend namespace of
// top, over IPv4 (or IPv6 with v6), and returns the service balancing them.
func echoService(t *testing.T, top *topology, name string, port uint16, v6 bool, h handler) service {
	t.Helper()
	svc := service{Name: name, Listen: netip.AddrPortFrom(vip4, port)}
	if v6 {
		svc.Listen = netip.AddrPortFrom(vip6, port)
	}
	for _, b := range top.Backends {
		addr := netip.AddrPortFrom(b.Addr4, port)
		if v6 {
			addr = netip.AddrPortFrom(b.Addr6, port)
		}
		startBackend(t, b.NS, b.Name, addr, h)
		svc.Backends = append(svc.Backends, addr)
	}
	return svc
}

// iperf3Result is the part of `iperf3 -J` output the test reads.
type iperf3Result struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			Bytes       int64 `json:"bytes"`
			Retransmits int64 `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Seconds       float64 `json:"seconds"`
			Bytes         int64   `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
}

// TestIperf3 runs a 3-second iperf3 test from a client namespace through
// l4lb to an iperf3 server in a backend namespace.
func TestIperf3(t *testing.T) {
	top := newTopology(t, 1, 1, 2)
	const port = 5201
	svc := service{Name: "iperf", Listen: netip.AddrPortFrom(vip4, port)}
	// iperf3 opens a control and a data connection from one client
	// address; hashing the source IP sends both to the same backend, which
	// may be either, so every backend runs a server.
	for _, b := range top.Backends {
		startIperf3Server(t, b.NS, b.Addr4.String(), strconv.Itoa(port))
		svc.Backends = append(svc.Backends, netip.AddrPortFrom(b.Addr4, port))
	}
	startLB(t, top.LB, configTOML(svc))

	c := top.Clients[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", c.NS,
		"iperf3", "-c", vip4.String(), "-p", strconv.Itoa(port), "-B", c.Addrs4[0].String(),
		"-t", "3", "-J", "--connect-timeout", "3000").Output()
	var res iperf3Result
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		t.Fatalf("iperf3 client: %v\n%s", errors.Join(err, jerr), out)
	}
	if err != nil || res.Error != "" {
		t.Fatalf("iperf3 client: %v: %s", err, res.Error)
	}
	recv := res.End.SumReceived
	if recv.Bytes <= 0 {
		t.Fatalf("iperf3 server received %d bytes, want > 0\n%s", recv.Bytes, out)
	}
	t.Logf("iperf3 through l4lb: %.2f Gbit/s (%d MiB in %.1f s, %d retransmits)",
		recv.BitsPerSecond/1e9, recv.Bytes>>20, recv.Seconds, res.End.SumSent.Retransmits)
}

// TestEchoChecksums sends 10 MiB each way over four concurrent connections
// and checks that the echo matches byte for byte (by SHA-256).
func TestEchoChecksums(t *testing.T) {
	const conns, size = 4, 10 << 20
	top := newTopology(t, 1, conns, 2)
	startLB(t, top.LB, configTOML(echoService(t, top, "echo", echoPort, false, echo)))

	c := top.Clients[0]
	var wg sync.WaitGroup
	for i, src := range c.Addrs4 {
		wg.Go(func() {
			conn, err := dialFrom(c.NS, src, netip.AddrPortFrom(vip4, echoPort))
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			start := time.Now()
			name, err := echoRoundTrip(conn, size, uint64(i))
			if err != nil {
				t.Errorf("from %s: %v", src, err)
				return
			}
			t.Logf("from %s via %s: %d MiB each way in %v", src, name, size>>20, time.Since(start).Round(time.Millisecond))
		})
	}
	wg.Wait()
}

// TestHalfClose checks that l4lb carries a half-close each way and delivers
// what a backend wrote just before it closed.
func TestHalfClose(t *testing.T) {
	top := newTopology(t, 1, 1, 2)
	sums := make(chan [32]byte, len(top.Backends))
	digest := echoService(t, top, "digest", 7001, false, digestAfterEOF)
	greet := echoService(t, top, "greet", 7002, false, greetThenRead(sums))
	startLB(t, top.LB, configTOML(digest, greet))
	c := top.Clients[0]

	t.Run("client closes first", func(t *testing.T) {
		// The backend answers only after it sees EOF, and then closes at
		// once: the reply arrives only if l4lb passed on the CloseWrite, and
		// whole only if it flushed before closing.
		payload := make([]byte, 4<<20)
		rand.NewChaCha8([32]byte{1}).Read(payload)
		conn, err := dialFrom(c.NS, c.Addrs4[0], digest.Listen)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := conn.Write(payload); err != nil {
			t.Fatalf("write: %v", err)
		}
		if err := conn.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		br := bufio.NewReader(conn)
		name, err := readGreeting(br)
		if err != nil {
			t.Fatal(err)
		}
		sumLine, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read digest line from %s: %v", name, err)
		}
		data, err := io.ReadAll(br) // nil error means a clean EOF, not a reset
		if err != nil {
			t.Fatalf("read reply from %s after %d bytes: %v", name, len(data), err)
		}
		want := sha256.Sum256(payload)
		if sumLine != hex.EncodeToString(want[:])+"\n" {
			t.Errorf("%s saw sha256 %q, sent %x", name, sumLine, want)
		}
		if !bytes.Equal(data, payload) {
			t.Errorf("reply from %s: %d bytes, not the %d sent", name, len(data), len(payload))
		}
	})

	t.Run("backend closes first", func(t *testing.T) {
		// The backend closes its write side at once; the client must see
		// EOF yet still be able to send, and the backend must get it all.
		conn, err := dialFrom(c.NS, c.Addrs4[0], greet.Listen)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(ioTimeout))
		br := bufio.NewReader(conn)
		name, err := readGreeting(br)
		if err != nil {
			t.Fatal(err)
		}
		if rest, err := io.ReadAll(br); err != nil || len(rest) > 0 {
			t.Fatalf("after the greeting of %s: read %q, %v; want a clean EOF", name, rest, err)
		}
		payload := make([]byte, 1<<20)
		rand.NewChaCha8([32]byte{2}).Read(payload)
		if _, err := conn.Write(payload); err != nil {
			t.Fatalf("write after the backend's EOF: %v", err)
		}
		if err := conn.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		select {
		case got := <-sums:
			if want := sha256.Sum256(payload); got != want {
				t.Errorf("%s read sha256 %x, sent %x", name, got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s did not see EOF within 10s of CloseWrite", name)
		}
	})
}

// TestMaglevPrediction connects from 20 source addresses and checks that
// each lands on the backend l4.Plan predicts.
func TestMaglevPrediction(t *testing.T) {
	top := newTopology(t, 2, 10, 3)
	conf := configTOML(echoService(t, top, "echo", echoPort, false, echo))
	plan := planFor(t, conf, "echo")
	startLB(t, top.LB, conf)

	reached := map[string]int{}
	for _, c := range top.Clients {
		for _, src := range c.Addrs4 {
			name, local, err := greeting(c.NS, src, netip.AddrPortFrom(vip4, echoPort))
			if err != nil {
				t.Errorf("from %s: %v", src, err)
				continue
			}
			if want := firstChoice(t, top, plan, local); name != want {
				t.Errorf("from %s: reached %s, plan says %s", local, name, want)
			}
			reached[name]++
		}
	}
	t.Logf("connections per backend: %v", reached)
	if len(reached) < 2 {
		t.Errorf("all connections reached %v: want more than one backend", slices.Collect(maps.Keys(reached)))
	}
}

// TestRefusedBackend stops one backend from listening: the clients whose
// first choice it is must land on another backend, and the others must not
// move.
func TestRefusedBackend(t *testing.T) {
	top := newTopology(t, 2, 12, 3)
	svc := service{Name: "echo", Listen: netip.AddrPortFrom(vip4, echoPort)}
	for _, b := range top.Backends {
		svc.Backends = append(svc.Backends, netip.AddrPortFrom(b.Addr4, echoPort))
	}
	conf := configTOML(svc)
	plan := planFor(t, conf, "echo")

	// Refuse on the backend that is the first choice of the most sources
	// (source_ip hashing ignores the port).
	firsts := map[string]int{}
	for _, c := range top.Clients {
		for _, src := range c.Addrs4 {
			firsts[firstChoice(t, top, plan, netip.AddrPortFrom(src, 0))]++
		}
	}
	refused := top.Backends[0].Name
	for name, n := range firsts {
		if n > firsts[refused] {
			refused = name
		}
	}
	if firsts[refused] < 3 {
		t.Fatalf("first choices %v: no backend is the first choice of 3 sources; use more sources", firsts)
	}
	t.Logf("first choices %v; %s refuses connections", firsts, refused)
	for _, b := range top.Backends {
		if b.Name != refused {
			startBackend(t, b.NS, b.Name, netip.AddrPortFrom(b.Addr4, echoPort), echo)
		}
	}
	startLB(t, top.LB, conf)

	for _, c := range top.Clients {
		for _, src := range c.Addrs4 {
			name, local, err := greeting(c.NS, src, svc.Listen)
			if err != nil {
				t.Errorf("from %s: %v", src, err)
				continue
			}
			want := firstChoice(t, top, plan, local)
			switch {
			case name == refused:
				t.Errorf("from %s: reached %s, which refuses connections", local, name)
			case want != refused && name != want:
				t.Errorf("from %s: reached %s, plan says %s (which is up)", local, name, want)
			}
		}
	}
}

// TestIPv6 balances an IPv6 service over IPv6 backends.
func TestIPv6(t *testing.T) {
	top := newTopology(t, 1, 4, 2)
	conf := configTOML(echoService(t, top, "echo6", echoPort, true, echo))
	plan := planFor(t, conf, "echo6")
	startLB(t, top.LB, conf)

	c := top.Clients[0]
	for i, src := range c.Addrs6 {
		conn, err := dialFrom(c.NS, src, netip.AddrPortFrom(vip6, echoPort))
		if err != nil {
			t.Error(err)
			continue
		}
		local := localAddrPort(conn)
		name, err := echoRoundTrip(conn, 256<<10, uint64(100+i))
		conn.Close()
		if err != nil {
			t.Errorf("from %s: %v", local, err)
			continue
		}
		if want := firstChoice(t, top, plan, local); name != want {
			t.Errorf("from %s: reached %s, plan says %s", local, name, want)
		}
	}
}
