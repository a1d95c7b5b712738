package l4

import (
	"fmt"
	"sync"
	"testing"

	"github.com/l4lb/l4lb/config"
)

func TestNewBalancerKinds(t *testing.T) {
	members := testMembers(1, 2)
	for _, tc := range []struct {
		kind config.Balance
		want string
	}{
		{config.Maglev, "*l4.maglev"},
		{config.RoundRobin, "*l4.roundRobin"},
		{config.LeastConn, "*l4.leastConn"},
	} {
		if got := fmt.Sprintf("%T", newBalancer(tc.kind, members)); got != tc.want {
			t.Errorf("newBalancer(%q) is %s, want %s", tc.kind, got, tc.want)
		}
	}
	for _, kind := range []config.Balance{config.Maglev, config.RoundRobin, config.LeastConn} {
		if got := newBalancer(kind, nil).pick(1, nil); got != -1 {
			t.Errorf("%s with no members: pick = %d, want -1", kind, got)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("newBalancer(\"random\") did not panic")
		}
	}()
	newBalancer("random", members)
}

var rrWeightSets = [][]int{
	{1},
	{3, 3, 3},
	{5, 1, 1},
	{1, 2, 3, 4},
	{100, 200},
	{10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
	{7, 5, 3, 2, 1},
	{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20},
	{13, 17, 19, 23},
	{3, 1, 3, 1, 2, 2, 3, 1, 1},
	{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 100},
	{64, 1, 1, 1, 32, 32, 2, 2, 2, 2},
}

func TestRoundRobinSequence(t *testing.T) {
	for _, weights := range rrWeightSets {
		t.Run(fmt.Sprint(weights), func(t *testing.T) {
			rr := newRoundRobin(testMembers(weights...))
			seq := rr.seq
			g, total := 0, 0
			for _, w := range weights {
				g = int(gcd(int64(g), int64(w)))
				total += w
			}
			if len(seq) != total/g {
				t.Fatalf("period %d, want sum/gcd = %d", len(seq), total/g)
			}

			// Exact shares over one period.
			counts := make([]int, len(weights))
			for _, i := range seq {
				counts[i]++
			}
			for i, w := range weights {
				if counts[i] != w/g {
					t.Errorf("member %d weight %d: %d picks per period of %d, want %d", i, w, counts[i], len(seq), w/g)
				}
			}

			// Smooth: in every window of every length, wrapping around
			// the period, no member gets more than its share rounded up
			// plus one. prefix[i][p] counts member i in seq[:p] of two
			// laps.
			period := len(seq)
			prefix := make([][]int, len(weights))
			for i := range prefix {
				prefix[i] = make([]int, 2*period+1)
				for p := range 2 * period {
					prefix[i][p+1] = prefix[i][p]
					if int(seq[p%period]) == i {
						prefix[i][p+1]++
					}
				}
			}
			for length := 1; length <= period; length++ {
				for i, w := range weights {
					limit := (w/g*length+period-1)/period + 1
					for start := range period {
						if n := prefix[i][start+length] - prefix[i][start]; n > limit {
							t.Fatalf("member %d weight %d: %d picks in window [%d, +%d) of %v, want <= %d",
								i, w, n, start, length, seq, limit)
						}
					}
				}
			}
		})
	}
}

func TestRoundRobinPickFollowsSequence(t *testing.T) {
	rr := newRoundRobin(testMembers(5, 1, 1))
	// nginx over the classes {a} (weight 5) and {b, c} (weight 2): a B a a
	// a B a, the class's turns going to b, then c.
	want := []int{0, 1, 0, 0, 0, 2, 0}
	for lap := range 3 {
		for p, w := range want {
			if got := rr.pick(uint64(p), nil); got != w {
				t.Fatalf("lap %d pick %d = %d, want %d", lap, p, got, w)
			}
		}
	}
}

func TestRoundRobinTried(t *testing.T) {
	members := testMembers(5, 1, 1)
	rr := newRoundRobin(members)
	for range 20 {
		var tried []int
		for range members {
			got := rr.pick(0, tried)
			if got < 0 || got >= len(members) || contains(tried, got) {
				t.Fatalf("tried %v: pick = %d, want a new member", tried, got)
			}
			tried = append(tried, got)
		}
		if got := rr.pick(0, tried); got != -1 {
			t.Fatalf("all tried: pick = %d, want -1", got)
		}
	}
	// With the heavy member tried, the light ones share its place evenly.
	counts := make([]int, 3)
	for range 700 {
		counts[rr.pick(0, []int{0})]++
	}
	if counts[0] != 0 || counts[1] != 350 || counts[2] != 350 {
		t.Errorf("retries after member 0 went %v, want [0 350 350]", counts)
	}
}

// TestRoundRobinTriedHeavy covers the walk after the redraws: the tried
// member holds 1000 of every 1001 positions.
func TestRoundRobinTriedHeavy(t *testing.T) {
	rr := newRoundRobin(testMembers(1000, 1))
	for range 100 {
		if got := rr.pick(0, []int{0}); got != 1 {
			t.Fatalf("member 0 tried: pick = %d, want 1", got)
		}
	}
}

// TestRoundRobinScaled checks the memory bound: a period that would be a
// million entries is scaled down, and every member still appears.
func TestRoundRobinScaled(t *testing.T) {
	weights := []int{1_000_000, 1, 3, 999_983}
	rr := newRoundRobin(testMembers(weights...))
	if len(rr.seq) > rrMaxPeriod+len(weights) {
		t.Fatalf("period %d, want <= %d", len(rr.seq), rrMaxPeriod+len(weights))
	}
	counts := make([]int, len(weights))
	for _, i := range rr.seq {
		counts[i]++
	}
	for i, c := range counts {
		if c == 0 {
			t.Errorf("member %d (weight %d) missing from the scaled sequence", i, weights[i])
		}
	}
	if r := float64(counts[0]) / float64(counts[3]); r < 0.99 || r > 1.01 {
		t.Errorf("heavy members' ratio %.3f after scaling, want ~1", r)
	}
}

// TestRoundRobinConcurrent runs whole periods from many goroutines: every
// position is handed out exactly once, so the shares stay exact.
func TestRoundRobinConcurrent(t *testing.T) {
	weights := []int{1, 2, 3, 4}
	rr := newRoundRobin(testMembers(weights...))
	const goroutines, perG = 8, 10 * 1000 // 80000 picks, 8000 periods of 10
	counts := make([][]int, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		counts[g] = make([]int, len(weights))
		wg.Go(func() {
			for range perG {
				counts[g][rr.pick(0, nil)]++
			}
		})
	}
	wg.Wait()
	for i, w := range weights {
		sum := 0
		for g := range goroutines {
			sum += counts[g][i]
		}
		if want := goroutines * perG / 10 * w; sum != want {
			t.Errorf("member %d weight %d: %d picks, want %d", i, w, sum, want)
		}
	}
}

func TestLeastConn(t *testing.T) {
	for _, tc := range []struct {
		name    string
		weights []int
		active  []int64
		tried   []int
		want    int
	}{
		{"fewest", []int{1, 1, 1}, []int64{5, 2, 9}, nil, 1},
		{"per weight", []int{1, 2, 1}, []int64{10, 15, 9}, nil, 1},  // 10, 7.5, 9
		{"weight loses", []int{1, 3, 1}, []int64{3, 12, 5}, nil, 0}, // 3, 4, 5
		{"skip tried", []int{1, 2, 1}, []int64{10, 15, 9}, []int{1}, 2},
		{"all tried", []int{1, 1}, []int64{0, 0}, []int{1, 0}, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			members := testMembers(tc.weights...)
			for i, a := range tc.active {
				members[i].active.Store(a)
			}
			lc := newLeastConn(members)
			// The answer must not depend on where the rotation starts.
			for range len(members) {
				if got := lc.pick(0, tc.tried); got != tc.want {
					t.Fatalf("pick = %d, want %d", got, tc.want)
				}
			}
		})
	}
}

func TestLeastConnRotatesTies(t *testing.T) {
	// Members 0, 1, 2 carry one connection per unit of weight (1/1, 2/2,
	// 3/3) and tie; member 3 at 2/1 is busier.
	members := testMembers(1, 2, 3, 1)
	for i, a := range []int64{1, 2, 3, 2} {
		members[i].active.Store(a)
	}
	lc := newLeastConn(members)
	counts := make([]int, len(members))
	for range 4 * 100 {
		counts[lc.pick(0, nil)]++
	}
	// Four start positions, each taken 100 times: starting at 0 or 3 gives
	// member 0, at 1 member 1, at 2 member 2.
	if want := []int{200, 100, 100, 0}; fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("picks %v, want %v", counts, want)
	}
}

// TestLeastConnConcurrent is for -race: picks read counters while
// connections open and close.
func TestLeastConnConcurrent(t *testing.T) {
	members := testMembers(1, 1, 2, 4)
	lc := newLeastConn(members)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			open := make([]int, 0, 2000)
			for range cap(open) {
				i := lc.pick(0, nil)
				members[i].active.Add(1)
				open = append(open, i)
			}
			for _, i := range open {
				members[i].active.Add(-1)
			}
		})
	}
	wg.Wait()
	for i, mb := range members {
		if a := mb.active.Load(); a != 0 {
			t.Errorf("member %d active = %d after all closed", i, a)
		}
	}
}

func TestPickNoAlloc(t *testing.T) {
	members := testMembers(3, 1, 2)
	tried := []int{0}
	for _, kind := range []config.Balance{config.RoundRobin, config.LeastConn} {
		b := newBalancer(kind, members)
		if n := testing.AllocsPerRun(1000, func() {
			b.pick(9, nil)
			b.pick(9, tried)
		}); n != 0 {
			t.Errorf("%s pick allocates %v times", kind, n)
		}
	}
}

func BenchmarkRoundRobinPick(b *testing.B) {
	rr := newRoundRobin(testMembers(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			rr.pick(0, nil)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				rr.pick(0, nil)
			}
		})
	})
}

func BenchmarkLeastConnPick(b *testing.B) {
	for _, n := range []int{10, 100} {
		members := testMembers(equalWeights(n)...)
		for i := range members {
			members[i].active.Store(int64(i % 7))
		}
		lc := newLeastConn(members)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				lc.pick(0, nil)
			}
		})
	}
}

func BenchmarkRoundRobinBuild(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		weights := make([]int, n)
		for i := range weights {
			weights[i] = 1 + i%7
		}
		members := testMembers(weights...)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				newRoundRobin(members)
			}
		})
	}
}
