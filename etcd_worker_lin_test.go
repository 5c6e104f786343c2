package orchestrator

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator/util"
)

// The linearizability test: workers share one counter. On every Tick a
// worker reads the counter from its snapshot and, on every other Tick,
// increments it with a patch. The history of reads and increments is checked
// with porcupine against a sequential counter.
//
// What an operation's interval is, precisely (every bound must be sound, or
// the check would reject correct runs; every bound should be tight, or it
// would accept broken ones):
//
//   - Increment: its patch may run several times (conflicts); only the run
//     whose Txn landed counts. Each run also writes the worker's marker key
//     "<op>:<value>" in the same Patch, so the next Tick's snapshot (which
//     must contain the worker's own last commit) names the value that
//     landed. Call = the time that run started: the Txn it fed was sent, and
//     so landed, after it. Return = the start of the next Tick, which comes
//     after the commit. Output = the value written.
//   - Read: the counter in the snapshot of a Tick. The snapshot is at a
//     revision at or after the worker's own last landed increment, and at or
//     after its previous snapshots, so the value seen was current at some
//     moment after the call of that increment and before the Tick. Call =
//     that increment's call (0 before the worker's first increment), Return =
//     the Tick. A read of a value the worker itself had already overwritten,
//     a read older than a read it already made (when the value has moved),
//     or a lost or doubled increment cannot be linearized.

const linPrefix = "/test/lin"

type linKind int

const (
	linRead linKind = iota
	linInc
)

type linInput struct{ kind linKind }

// linModel is a counter starting at 0: increments return the value they
// wrote (old + 1), reads the current value.
var linModel = porcupine.Model{
	Init: func() any { return int64(0) },
	Step: func(state, input, output any) (bool, any) {
		st, out := state.(int64), output.(int64)
		switch input.(linInput).kind {
		case linInc:
			return out == st+1, out
		default:
			return out == st, st
		}
	},
	DescribeOperation: func(input, output any) string {
		if input.(linInput).kind == linInc {
			return fmt.Sprintf("inc() -> %d", output)
		}
		return fmt.Sprintf("read() -> %d", output)
	},
}

// linState holds the counter and this worker's marker.
type linState struct {
	markerRel string
	counter   int64
	marker    string
	patchQueue
}

func (s *linState) Update(key util.EtcdKey, value []byte, _ bool) error {
	k := key.String()
	if strings.Contains(k, reservedDir) {
		return fmt.Errorf("reserved key %q reached the ReactorState", k)
	}
	rel, ok := strings.CutPrefix(k, linPrefix)
	if !ok || !strings.HasPrefix(rel, "/") {
		return fmt.Errorf("key %q outside the prefix reached the ReactorState", k)
	}
	switch rel {
	case "/counter":
		if value == nil {
			return fmt.Errorf("counter deleted")
		}
		n, err := strconv.ParseInt(string(value), 10, 64)
		if err != nil {
			return fmt.Errorf("counter: %w", err)
		}
		s.counter = n
	case s.markerRel:
		s.marker = string(value)
	}
	return nil
}

// linRun is one run of an increment's patch.
type linRun struct {
	start int64
	value int64
}

// linWorker is the reactor of one worker; it records its part of the
// history. Tick and Patch both run on the worker's goroutine.
type linWorker struct {
	id      int
	ops     int
	now     func() int64
	history []porcupine.Operation

	ticks      int
	lowerBound int64     // call of the worker's last landed increment
	pendingOp  int       // sequence number of the increment in flight, 0: none
	pendingRun []linRun  // runs of its patch
	incs       int       // increments that landed
	reruns     int       // increments whose patch ran more than once
	seq        int       // increments emitted
	state      *linState // for the patch closure
}

func (w *linWorker) Tick(_ context.Context, state ReactorState) (ReactorState, error) {
	now := w.now()
	st := state.(*linState)
	if w.pendingOp != 0 {
		// The snapshot must hold our own last commit: find which run landed.
		op, value, err := parseLinMarker(st.marker)
		if err != nil || op != w.pendingOp {
			return st, fmt.Errorf("worker %d: Tick without its own last commit: marker %q, want op %d", w.id, st.marker, w.pendingOp)
		}
		call := int64(-1)
		for _, r := range w.pendingRun {
			if r.value == value {
				call = r.start
				break
			}
		}
		if call < 0 {
			return st, fmt.Errorf("worker %d: op %d landed value %d that no run of its patch wrote (runs %v)", w.id, op, value, w.pendingRun)
		}
		w.history = append(w.history, porcupine.Operation{
			ClientId: w.id, Input: linInput{linInc}, Call: call, Output: value, Return: now,
		})
		w.lowerBound = max(w.lowerBound, call)
		w.incs++
		if len(w.pendingRun) > 1 {
			w.reruns++
		}
		w.pendingOp, w.pendingRun = 0, nil
	}
	w.history = append(w.history, porcupine.Operation{
		ClientId: w.id, Input: linInput{linRead}, Call: w.lowerBound, Output: st.counter, Return: now,
	})
	if w.ticks == w.ops {
		return st, ErrReactorFinished
	}
	w.ticks++
	if (w.ticks+w.id)%2 == 0 {
		w.seq++
		w.pendingOp = w.seq
		st.patches = append(st.patches, []DataPatch{w.incPatch(w.seq)})
	}
	return st, nil
}

// incPatch increments the counter and writes the marker "<op>:<value>".
func (w *linWorker) incPatch(op int) DataPatch {
	counter := util.NewEtcdKey(linPrefix + "/counter")
	marker := util.NewEtcdKey(linPrefix + w.state.markerRel)
	return patchFunc(func(vm map[util.EtcdKey][]byte, cs map[util.EtcdKey]struct{}) error {
		start := w.now()
		var old int64
		if v, ok := vm[counter]; ok {
			var err error
			if old, err = strconv.ParseInt(string(v), 10, 64); err != nil {
				return err
			}
		}
		value := old + 1
		w.pendingRun = append(w.pendingRun, linRun{start: start, value: value})
		vm[counter] = []byte(strconv.FormatInt(value, 10))
		vm[marker] = []byte(fmt.Sprintf("%d:%d", op, value))
		cs[counter], cs[marker] = struct{}{}, struct{}{}
		return nil
	})
}

func parseLinMarker(s string) (op int, value int64, err error) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, fmt.Errorf("bad marker %q", s)
	}
	if op, err = strconv.Atoi(a); err != nil {
		return 0, 0, err
	}
	value, err = strconv.ParseInt(b, 10, 64)
	return op, value, err
}

// checkLin runs porcupine on history.
func checkLin(t testing.TB, history []porcupine.Operation) porcupine.CheckResult {
	t.Helper()
	res, _ := porcupine.CheckOperationsVerbose(linModel, history, 20*time.Second)
	return res
}

// TestEtcdWorkerLinearizability runs four workers on one counter and checks
// the recorded history with porcupine; the etcd counter must equal the
// number of landed increments. The sub-tests show that the check can fail:
// histories with a lost increment, a stale read or a read-your-writes
// violation are rejected.
func TestEtcdWorkerLinearizability(t *testing.T) {
	t.Parallel()
	const (
		workers = 5
		ops     = 60 // Ticks per worker; every other one increments
	)
	env := newTestEnv(t)
	ctx := testContext(t)
	start := time.Now()
	now := func() int64 { return int64(time.Since(start)) }

	ws := make([]*linWorker, workers)
	g, gctx := errgroup.WithContext(ctx)
	for i := range ws {
		st := &linState{markerRel: fmt.Sprintf("/marker/%d", i)}
		lw := &linWorker{id: i, ops: ops, now: now, state: st}
		ws[i] = lw
		w := mustNewEtcdWorker(t, env.client(t), linPrefix, lw, st)
		g.Go(func() error { return w.Run(gctx, nil, behaviourTick, fmt.Sprintf("lin-%d", i)) })
	}
	require.NoError(t, g.Wait())

	var history []porcupine.Operation
	var incs, reruns int64
	for _, w := range ws {
		history = append(history, w.history...)
		incs += int64(w.incs)
		reruns += int64(w.reruns)
	}
	t.Logf("%d operations, %d increments, %d of them re-run after a conflict", len(history), incs, reruns)
	cli := env.client(t)
	resp, err := cli.Get(ctx, linPrefix+"/counter")
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 1)
	require.Equal(t, incs, mustInt(t, resp.Kvs[0].Value), "etcd's counter vs landed increments")
	checkStart := time.Now()
	require.Equal(t, porcupine.Ok, checkLin(t, history), "history of %d operations is not linearizable", len(history))
	t.Logf("porcupine took %v", time.Since(checkStart))

	// The check is not vacuous: corrupted versions of the same history are
	// rejected.
	lastReturn := int64(0)
	var incIdx []int
	for i, op := range history {
		lastReturn = max(lastReturn, op.Return)
		if op.Input.(linInput).kind == linInc {
			incIdx = append(incIdx, i)
		}
	}
	require.GreaterOrEqual(t, len(incIdx), 2)
	corrupt := map[string]func(h []porcupine.Operation) []porcupine.Operation{
		"two increments wrote the same value": func(h []porcupine.Operation) []porcupine.Operation {
			h[incIdx[1]].Output = h[incIdx[0]].Output
			return h
		},
		"stale read after everything finished": func(h []porcupine.Operation) []porcupine.Operation {
			return append(h, porcupine.Operation{ClientId: workers, Input: linInput{linRead},
				Call: lastReturn + 1, Output: incs - 1, Return: lastReturn + 2})
		},
		"read of a value never written": func(h []porcupine.Operation) []porcupine.Operation {
			return append(h, porcupine.Operation{ClientId: workers, Input: linInput{linRead},
				Call: 0, Output: incs + 1, Return: lastReturn + 2})
		},
		"read misses the reader's own increment": func(h []porcupine.Operation) []porcupine.Operation {
			// The same client reads, after its increment returned, the
			// value from before it.
			inc := h[incIdx[0]]
			return append(h, porcupine.Operation{ClientId: inc.ClientId, Input: linInput{linRead},
				Call: inc.Return + 1, Output: inc.Output.(int64) - 1, Return: inc.Return + 2})
		},
	}
	for name, fn := range corrupt {
		t.Run(name, func(t *testing.T) {
			h := fn(append([]porcupine.Operation(nil), history...))
			require.Equal(t, porcupine.Illegal, checkLin(t, h))
		})
	}
}
