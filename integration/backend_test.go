package integration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// ioTimeout bounds every connection of the tests, client or backend side,
// so that a lost byte fails the test instead of hanging it.
const ioTimeout = 60 * time.Second

// handler serves one backend connection; name is the backend's name. The
// connection is closed after it returns.
type handler func(name string, c *net.TCPConn) error

// backend is a Go TCP server inside a backend namespace.
type backend struct {
	name string
	ln   net.Listener
	wg   sync.WaitGroup // the accept loop and every handler

	mu     sync.Mutex // guards conns and closed
	conns  map[net.Conn]struct{}
	closed bool
}

// startBackend serves h on addr inside namespace ns until cleanup, which
// closes the listener and every open connection and waits for the handlers.
func startBackend(t *testing.T, ns, name string, addr netip.AddrPort, h handler) {
	t.Helper()
	serveBackend(t, ns, name, addr, h)
}

// serveBackend is startBackend for a test that stops the backend itself
// (a server stopped, then started again on the same address): stop does
// what the cleanup does, once.
func serveBackend(t *testing.T, ns, name string, addr netip.AddrPort, h handler) (stop func()) {
	t.Helper()
	ln, err := listenIn(ns, addr)
	if err != nil {
		t.Fatalf("backend %s: listen on %s in %s: %v", name, addr, ns, err)
	}
	b := &backend{name: name, ln: ln, conns: make(map[net.Conn]struct{})}
	b.wg.Go(func() { b.serve(t, h) })
	stop = sync.OnceFunc(func() {
		ln.Close()
		b.mu.Lock()
		b.closed = true
		for c := range b.conns {
			c.Close()
		}
		b.mu.Unlock()
		b.wg.Wait()
	})
	t.Cleanup(stop)
	return stop
}

func (b *backend) serve(t *testing.T, h handler) {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("backend %s: accept: %v", b.name, err)
			}
			return
		}
		if !b.track(c) {
			c.Close()
			return
		}
		b.wg.Go(func() {
			defer b.untrack(c)
			c.SetDeadline(time.Now().Add(ioTimeout))
			// Errors are expected when a test cuts a connection on
			// purpose; the client side asserts what matters.
			if err := h(b.name, c.(*net.TCPConn)); err != nil {
				t.Logf("backend %s: %v", b.name, err)
			}
		})
	}
}

// track records an accepted connection; false once cleanup has begun.
func (b *backend) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.conns[c] = struct{}{}
	return true
}

func (b *backend) untrack(c net.Conn) {
	c.Close()
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
}

// echo sends the greeting "backend NAME\n", echoes until the client's EOF,
// then closes its own write side.
func echo(name string, c *net.TCPConn) error {
	if _, err := fmt.Fprintf(c, "backend %s\n", name); err != nil {
		return err
	}
	if _, err := io.Copy(c, c); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return c.CloseWrite()
}

// digestAfterEOF reads until EOF and only then answers: the greeting, the
// hex SHA-256 of what it read and "\n", then the bytes themselves. It closes
// right after the last write, so the proxy must still deliver what it has
// buffered.
func digestAfterEOF(name string, c *net.TCPConn) error {
	data, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read request: %w", err)
	}
	w := bufio.NewWriter(c)
	fmt.Fprintf(w, "backend %s\n%x\n", name, sha256.Sum256(data))
	w.Write(data)
	return w.Flush()
}

// greetThenRead returns a handler that sends the greeting and closes its
// write side at once, then reads until EOF and reports the SHA-256 of what
// it read on sums.
func greetThenRead(sums chan<- [32]byte) handler {
	return func(name string, c *net.TCPConn) error {
		if _, err := fmt.Fprintf(c, "backend %s\n", name); err != nil {
			return err
		}
		if err := c.CloseWrite(); err != nil {
			return err
		}
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return fmt.Errorf("read after CloseWrite: %w", err)
		}
		sums <- [32]byte(h.Sum(nil))
		return nil
	}
}

// readGreeting reads "backend NAME\n" and returns NAME.
func readGreeting(r *bufio.Reader) (string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read greeting: %w (got %q)", err, line)
	}
	name, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "backend ")
	if !ok {
		return "", fmt.Errorf("greeting %q: want \"backend NAME\"", line)
	}
	return name, nil
}

// greeting dials dst from src in namespace ns, reads the backend's name and
// closes the connection.
func greeting(ns string, src netip.Addr, dst netip.AddrPort) (name string, local netip.AddrPort, err error) {
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	name, err = readGreeting(bufio.NewReader(c))
	return name, localAddrPort(c), err
}

// echoRoundTrip sends n pseudo-random bytes (from seed) on c, an
// echo connection, while it reads the echo concurrently; then it half-closes
// and checks that the echo has the same length and SHA-256 and ends in a
// clean EOF. It returns the backend's name.
func echoRoundTrip(c *net.TCPConn, n int64, seed uint64) (string, error) {
	c.SetDeadline(time.Now().Add(ioTimeout))
	br := bufio.NewReader(c)
	name, err := readGreeting(br)
	if err != nil {
		return "", err
	}
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() {
		var key [32]byte
		binary.LittleEndian.PutUint64(key[:], seed)
		src := rand.NewChaCha8(key)
		_, err := io.Copy(c, io.TeeReader(io.LimitReader(src, n), sent))
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got := sha256.New()
	m, rerr := io.Copy(got, br)
	if err := <-werr; err != nil {
		return name, fmt.Errorf("send to %s: %w", name, err)
	}
	if rerr != nil {
		return name, fmt.Errorf("read echo from %s after %d bytes: %w", name, m, rerr)
	}
	if m != n || !bytes.Equal(sent.Sum(nil), got.Sum(nil)) {
		return name, fmt.Errorf("echo from %s: got %d bytes sha256 %x, sent %d bytes sha256 %x", name, m, got.Sum(nil), n, sent.Sum(nil))
	}
	return name, nil
}

// service is one [services.NAME] table of a test config: a Maglev TCP
// service hashing the source IP.
type service struct {
	Name         string
	Listen       netip.AddrPort
	DrainTimeout string // "5s" when empty
	Backends     []netip.AddrPort
}

// configTOML renders a complete l4lb config with the admin endpoint off.
func configTOML(svcs ...service) string {
	var b strings.Builder
	b.WriteString("[admin]\nlisten = \"\"\n")
	for _, s := range svcs {
		drain := s.DrainTimeout
		if drain == "" {
			drain = "5s"
		}
		fmt.Fprintf(&b, `
[services.%s]
listen = %q
protocol = "tcp"
balance = "maglev"
hash_key = "source_ip"
workers = 2
connect_timeout = "2s"
idle_timeout = "1m"
drain_timeout = %q
`, s.Name, s.Listen, drain)
		for _, a := range s.Backends {
			fmt.Fprintf(&b, "\n  [[services.%s.backends]]\n  address = %q\n", s.Name, a)
		}
	}
	return b.String()
}

// planFor compiles conf as l4lb does and returns the Maglev plan of service
// name, which predicts each client's first-choice backend.
func planFor(t *testing.T, conf, name string) *l4.Plan {
	t.Helper()
	cfg, err := config.Parse([]byte(conf), "test.toml")
	if err != nil {
		t.Fatalf("parse test config: %v\n%s", err, conf)
	}
	svc := cfg.Service(name)
	if svc == nil {
		t.Fatalf("test config has no service %q", name)
	}
	return l4.NewPlan(svc)
}

// firstChoice is the name of the backend the plan sends src to first.
func firstChoice(t *testing.T, top *topology, plan *l4.Plan, src netip.AddrPort) string {
	t.Helper()
	addr, ok := plan.First(src)
	if !ok {
		t.Fatalf("plan has no backend for %s", src)
	}
	b := top.backendByAddr(addr.Addr())
	if b == nil {
		t.Fatalf("plan picks %s, which is no backend of the topology", addr)
	}
	return b.Name
}
