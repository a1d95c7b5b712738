package l4

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/l4lb/l4lb/config"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata")

// testMembers returns one member per weight, keyed 10.0.<i/256>.<i%256>:80.
func testMembers(weights ...int) []member {
	ms := make([]member, len(weights))
	for i, w := range weights {
		addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 80)
		ms[i] = member{key: addr.String(), weight: w, active: new(atomic.Int64)}
	}
	return ms
}

func equalWeights(n int) []int {
	ws := make([]int, n)
	for i := range ws {
		ws[i] = 1
	}
	return ws
}

// slotKeys returns the key owning each slot: the caller-order-free view of a
// table, which is what must agree between nodes.
func slotKeys(m *maglev, members []member) []string {
	keys := make([]string, len(m.table))
	for s, i := range m.table {
		keys[s] = members[i].key
	}
	return keys
}

func slotCounts(m *maglev, n int) []int {
	counts := make([]int, n)
	for _, i := range m.table {
		counts[i]++
	}
	return counts
}

func TestMaglevSlotBalance(t *testing.T) {
	members := testMembers(equalWeights(10)...)
	m := newMaglev(members, DefaultMaglevSize)
	counts := slotCounts(m, len(members))
	lo, hi := counts[0], counts[0]
	for _, c := range counts {
		lo, hi = min(lo, c), max(hi, c)
	}
	if lo == 0 || float64(hi)/float64(lo) > 1.01 {
		t.Errorf("slot counts %v: max/min = %d/%d, want <= 1.01", counts, hi, lo)
	}
}

func TestMaglevWeights(t *testing.T) {
	for _, weights := range [][]int{
		{1, 2, 3, 4},
		{100, 200},
		{1, 100},
		{5, 1, 1},
		{10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
		{7, 13, 29, 64, 3, 3},
	} {
		t.Run(fmt.Sprint(weights), func(t *testing.T) {
			m := newMaglev(testMembers(weights...), DefaultMaglevSize)
			counts := slotCounts(m, len(weights))
			total := 0
			for _, w := range weights {
				total += w
			}
			for i, w := range weights {
				want := float64(DefaultMaglevSize) * float64(w) / float64(total)
				if got := float64(counts[i]); got < want*0.98 || got > want*1.02 {
					t.Errorf("member %d weight %d: %d slots, want %.1f ±2%%", i, w, counts[i], want)
				}
			}
		})
	}
}

// disruption counts the slots that change owner between before and after
// although neither owner is the backend that was removed or added.
func disruption(before, after []string, changed string) int {
	moved := 0
	for s := range before {
		if before[s] != after[s] && before[s] != changed && after[s] != changed {
			moved++
		}
	}
	return moved
}

func TestMaglevDisruption(t *testing.T) {
	all := testMembers(equalWeights(10)...)
	removed := all[3].key
	rest := append(append([]member(nil), all[:3]...), all[4:]...)

	full := slotKeys(newMaglev(all, DefaultMaglevSize), all)
	less := slotKeys(newMaglev(rest, DefaultMaglevSize), rest)
	limit := DefaultMaglevSize * 2 / 100

	if moved := disruption(full, less, removed); moved > limit {
		t.Errorf("removing %s moved %d slots of other backends, want <= %d", removed, moved, limit)
	} else {
		t.Logf("removing %s moved %d slots of other backends (%.2f%%)", removed, moved, 100*float64(moved)/DefaultMaglevSize)
	}
	if moved := disruption(less, full, removed); moved > limit {
		t.Errorf("adding %s back moved %d slots of other backends, want <= %d", removed, moved, limit)
	}
	// Every slot of the removed backend must go somewhere.
	for s := range full {
		if less[s] == removed {
			t.Fatalf("slot %d still owned by removed backend", s)
		}
	}
}

func TestMaglevCallerOrder(t *testing.T) {
	members := testMembers(1, 2, 3, 4, 5, 1, 1, 2, 8, 3)
	want := slotKeys(newMaglev(members, DefaultMaglevSize), members)
	r := rand.New(rand.NewPCG(1, 2))
	for range 5 {
		shuffled := append([]member(nil), members...)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		got := slotKeys(newMaglev(shuffled, DefaultMaglevSize), shuffled)
		for s := range want {
			if got[s] != want[s] {
				t.Fatalf("shuffled members: slot %d owned by %s, want %s", s, got[s], want[s])
			}
		}
	}
}

// goldenMembers mix weights and address families, and are deliberately not in
// key order.
func goldenMembers() []member {
	specs := []struct {
		addr   string
		weight int
	}{
		{"192.168.1.10:80", 5},
		{"10.0.0.2:80", 2},
		{"[2001:db8::1]:80", 4},
		{"10.0.0.1:80", 1},
		{"[2001:db8::2]:443", 1},
		{"10.0.0.3:8080", 3},
	}
	ms := make([]member, len(specs))
	for i, s := range specs {
		ms[i] = member{key: netip.MustParseAddrPort(s.addr).String(), weight: s.weight, active: new(atomic.Int64)}
	}
	return ms
}

// TestMaglevGolden pins the table: the hashes, seeds and fill order must never
// change silently, or nodes running different versions would send the same
// client to different backends during a rolling upgrade.
// Regenerate (only on purpose) with: go test ./l4/ -run TestMaglevGolden -update
func TestMaglevGolden(t *testing.T) {
	members := goldenMembers()
	keys := slotKeys(newMaglev(members, DefaultMaglevSize), members)

	var b strings.Builder
	fmt.Fprintf(&b, "# Maglev table golden file; regenerate only on purpose with\n")
	fmt.Fprintf(&b, "# go test ./l4/ -run TestMaglevGolden -update\n")
	fmt.Fprintf(&b, "size %d\n", DefaultMaglevSize)
	for _, mb := range members {
		fmt.Fprintf(&b, "member %s weight %d\n", mb.key, mb.weight)
	}
	sum := sha256.Sum256([]byte(strings.Join(keys, "\n")))
	fmt.Fprintf(&b, "sha256 %s\n", hex.EncodeToString(sum[:]))
	for s := range 64 {
		fmt.Fprintf(&b, "slot %d %s\n", s, keys[s])
	}
	got := b.String()

	path := filepath.Join("testdata", "maglev_golden.txt")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		gl, wl := strings.Split(got, "\n"), strings.Split(string(want), "\n")
		for i := range min(len(gl), len(wl)) {
			if gl[i] != wl[i] {
				t.Fatalf("table differs from %s at line %d:\n got: %s\nwant: %s", path, i+1, gl[i], wl[i])
			}
		}
		t.Fatalf("table differs from %s in length: %d lines, want %d", path, len(gl), len(wl))
	}
}

func TestMaglevPickTried(t *testing.T) {
	members := testMembers(1, 2, 1, 3, 1, 1, 2, 1, 1, 1)
	m := newMaglev(members, DefaultMaglevSize)
	for k := range 200 {
		key := mix64(uint64(k))
		// The expected retry order: distinct owners in table order from
		// the key's slot on, wrapping around.
		var walk []int
		for s := range len(m.table) {
			i := int(m.table[(int(key%uint64(len(m.table)))+s)%len(m.table)])
			if !contains(walk, i) {
				walk = append(walk, i)
			}
		}
		if len(walk) != len(members) {
			t.Fatalf("table holds %d distinct members, want %d", len(walk), len(members))
		}
		var tried []int
		for step, want := range walk {
			got := m.pick(key, tried)
			if got != want {
				t.Fatalf("key %#x, tried %v: pick = %d, want %d (step %d)", key, tried, got, want, step)
			}
			tried = append(tried, got)
		}
		if got := m.pick(key, tried); got != -1 {
			t.Fatalf("key %#x, all tried: pick = %d, want -1", key, got)
		}
	}
}

func TestMaglevPickEdges(t *testing.T) {
	if got := newMaglev(nil, DefaultMaglevSize).pick(42, nil); got != -1 {
		t.Errorf("no members: pick = %d, want -1", got)
	}
	// Weight 1 beside 1000 in a 7-slot table wins no slot, but is still
	// the answer once the heavy backend is tried.
	members := testMembers(1000, 1)
	m := newMaglev(members, 7)
	if c := slotCounts(m, 2); c[1] != 0 {
		t.Fatalf("light member has %d slots, test needs 0", c[1])
	}
	if got := m.pick(3, []int{0}); got != 1 {
		t.Errorf("heavy tried: pick = %d, want 1", got)
	}
	if got := m.pick(3, []int{0, 1}); got != -1 {
		t.Errorf("all tried: pick = %d, want -1", got)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("newMaglev with size 65536 did not panic")
			}
		}()
		newMaglev(members, 65536)
	}()
}

func TestMaglevPickNoAlloc(t *testing.T) {
	m := newMaglev(testMembers(equalWeights(10)...), DefaultMaglevSize)
	tried := []int{m.pick(7, nil)}
	if n := testing.AllocsPerRun(1000, func() {
		m.pick(7, nil)
		m.pick(7, tried)
	}); n != 0 {
		t.Errorf("maglev pick allocates %v times", n)
	}
}

func TestClientKey(t *testing.T) {
	v4 := netip.MustParseAddrPort("1.2.3.4:1000")
	v4other := netip.MustParseAddrPort("1.2.3.4:2000")
	mapped := netip.MustParseAddrPort("[::ffff:1.2.3.4]:1000")
	v6 := netip.MustParseAddrPort("[2001:db8::1]:1000")
	zoned := netip.MustParseAddrPort("[2001:db8::1%eth0]:1000")

	if clientKey(v4, config.SourceIP) != clientKey(v4other, config.SourceIP) {
		t.Error("source_ip: port changes the key")
	}
	if clientKey(v4, config.SourceIPPort) == clientKey(v4other, config.SourceIPPort) {
		t.Error("source_ip_port: port does not change the key")
	}
	if clientKey(v4, config.SourceIP) == clientKey(v4, config.SourceIPPort) {
		t.Error("source_ip and source_ip_port keys collide")
	}
	for _, hk := range []config.HashKey{config.SourceIP, config.SourceIPPort} {
		if clientKey(v4, hk) != clientKey(mapped, hk) {
			t.Errorf("%s: ::ffff:1.2.3.4 and 1.2.3.4 differ", hk)
		}
		if clientKey(v4, hk) == clientKey(v6, hk) {
			t.Errorf("%s: 1.2.3.4 and 2001:db8::1 collide", hk)
		}
		if clientKey(v6, hk) != clientKey(zoned, hk) {
			t.Errorf("%s: the zone changes the key", hk)
		}
	}
	if n := testing.AllocsPerRun(1000, func() { clientKey(v6, config.SourceIPPort) }); n != 0 {
		t.Errorf("clientKey allocates %v times", n)
	}
}

// TestClientKeySpread feeds consecutive addresses and ports, the worst case
// for a weak hash, through a table of 10 equal backends.
func TestClientKeySpread(t *testing.T) {
	const n, keys = 10, 100_000
	m := newMaglev(testMembers(equalWeights(n)...), DefaultMaglevSize)
	check := func(t *testing.T, key func(i int) uint64) {
		counts := make([]int, n)
		for i := range keys {
			counts[m.pick(key(i), nil)]++
		}
		for i, c := range counts {
			if c < keys/n*9/10 || c > keys/n*11/10 {
				t.Errorf("backend %d got %d of %d keys, want %d ±10%% (all: %v)", i, c, keys, keys/n, counts)
			}
		}
	}
	t.Run("ipv4", func(t *testing.T) {
		check(t, func(i int) uint64 {
			a := netip.AddrFrom4([4]byte{172, 16 + byte(i>>16), byte(i >> 8), byte(i)})
			return clientKey(netip.AddrPortFrom(a, 40000), config.SourceIP)
		})
	})
	t.Run("ipv6", func(t *testing.T) {
		base := netip.MustParseAddr("2001:db8::").As16()
		check(t, func(i int) uint64 {
			a := base
			a[13], a[14], a[15] = byte(i>>16), byte(i>>8), byte(i)
			return clientKey(netip.AddrPortFrom(netip.AddrFrom16(a), 40000), config.SourceIP)
		})
	})
	t.Run("ports", func(t *testing.T) {
		check(t, func(i int) uint64 {
			// 100k keys need more than one address's 65536 ports.
			a := netip.MustParseAddr("192.0.2.7")
			if i >= 1<<16 {
				a = a.Next()
			}
			return clientKey(netip.AddrPortFrom(a, uint16(i)), config.SourceIPPort)
		})
	})
}

func TestPlanFirst(t *testing.T) {
	svc := &config.Service{
		Name:    "web",
		Balance: config.Maglev,
		HashKey: config.SourceIPPort,
		Backends: []config.Backend{
			{Address: netip.MustParseAddrPort("10.1.0.3:80"), Weight: 2},
			{Address: netip.MustParseAddrPort("10.1.0.1:80"), Weight: 1},
			{Address: netip.MustParseAddrPort("10.1.0.9:80"), Weight: 0},
			{Address: netip.MustParseAddrPort("[2001:db8::5]:80"), Weight: 3},
		},
	}
	// What the data path does by hand: weighted backends only, keyed by
	// address, the default table size.
	var addrs []netip.AddrPort
	var members []member
	for _, b := range svc.Backends {
		if b.Weight > 0 {
			addrs = append(addrs, b.Address)
			members = append(members, member{key: b.Address.String(), weight: b.Weight, active: new(atomic.Int64)})
		}
	}
	m := newMaglev(members, DefaultMaglevSize)

	reversed := *svc
	reversed.Backends = nil
	for i := len(svc.Backends) - 1; i >= 0; i-- {
		reversed.Backends = append(reversed.Backends, svc.Backends[i])
	}
	plan, plan2 := NewPlan(svc), NewPlan(&reversed)

	for i := range 2000 {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)}), uint16(1024+i))
		want := addrs[m.pick(clientKey(client, svc.HashKey), nil)]
		got, ok := plan.First(client)
		if !ok || got != want {
			t.Fatalf("First(%s) = %s, %v; want %s, true", client, got, ok, want)
		}
		if got2, _ := plan2.First(client); got2 != want {
			t.Fatalf("backends in reverse order: First(%s) = %s, want %s", client, got2, want)
		}
		if got == svc.Backends[2].Address {
			t.Fatalf("First(%s) chose the zero-weight backend", client)
		}
	}

	client := netip.MustParseAddrPort("198.51.100.1:5000")
	drained := *svc
	drained.Backends = []config.Backend{{Address: netip.MustParseAddrPort("10.1.0.1:80"), Weight: 0}}
	if got, ok := NewPlan(&drained).First(client); ok {
		t.Errorf("no weighted backend: First = %s, true; want false", got)
	}
	rr := *svc
	rr.Balance = config.RoundRobin
	if got, ok := NewPlan(&rr).First(client); ok {
		t.Errorf("round_robin: First = %s, true; want false", got)
	}
}

func BenchmarkMaglevBuild(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			weights := make([]int, n)
			for i := range weights {
				weights[i] = 1 + i%4
			}
			members := testMembers(weights...)
			b.ReportAllocs()
			for b.Loop() {
				newMaglev(members, DefaultMaglevSize)
			}
		})
	}
}

func BenchmarkMaglevPick(b *testing.B) {
	m := newMaglev(testMembers(equalWeights(100)...), DefaultMaglevSize)
	b.Run("first", func(b *testing.B) {
		b.ReportAllocs()
		var k uint64
		for b.Loop() {
			k += 0x9e3779b97f4a7c15
			m.pick(k, nil)
		}
	})
	b.Run("retry", func(b *testing.B) {
		b.ReportAllocs()
		var k uint64
		tried := make([]int, 0, 2)
		for b.Loop() {
			k += 0x9e3779b97f4a7c15
			tried = append(tried[:0], m.pick(k, nil))
			tried = append(tried, m.pick(k, tried))
			m.pick(k, tried)
		}
	})
}

func BenchmarkClientKey(b *testing.B) {
	for _, tc := range []struct {
		name string
		addr netip.AddrPort
		hk   config.HashKey
	}{
		{"ipv4", netip.MustParseAddrPort("192.0.2.1:40000"), config.SourceIP},
		{"ipv6-port", netip.MustParseAddrPort("[2001:db8::1]:40000"), config.SourceIPPort},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			var sink uint64
			for b.Loop() {
				sink += clientKey(tc.addr, tc.hk)
			}
			_ = sink
		})
	}
}
