// Command roles shows the owner/processor pattern of TiCDC on one shared
// Source: an owner worker on the whole prefix hands tasks to captures, and
// one processor worker per capture, on the capture's own prefix under it,
// does the tasks handed to it. All workers share one load, one watch and one
// copy of the keys; each keeps its own snapshot, barrier and commits.
//
//	go run ./examples/roles --tasks 200 --captures 3
//	go run ./examples/roles --endpoints http://127.0.0.1:2379
//
// Keys under --prefix: /task/<n> (a task, "" until assigned, then the
// capture's name), /capture/<c>/todo/<n> (handed to capture c) and
// /capture/<c>/done/<n> (done by it). At the end every task must be done
// exactly once, by the capture it was assigned to. It empties the prefix at
// the start, so it refuses a prefix that holds any other key. Without --endpoints it
// runs an embedded etcd in a temporary directory. It exits 1 if a task was
// lost or done twice, 2 for a bad flag.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/examples/internal/demo"
	"github.com/etcdworker/orchestrator/util"
)

// about is the first line of --help.
const about = "roles runs an owner and one processor per capture on one shared Source: each task is done exactly once."

type config struct {
	conn     demo.ConnConfig
	prefix   string
	tasks    int
	captures int
	timeout  time.Duration
	interval time.Duration
}

func main() { os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr)) }

// runMain is the whole program: it parses args, runs the demo and returns the
// exit code (0 OK, 1 error or a task lost or done twice, 2 bad flags).
func runMain(args []string, stdout, stderr io.Writer) int {
	return demo.Program("roles", about, args, stdout, stderr, defineFlags, run)
}

// defineFlags defines the command line of roles, storing into cfg.
func defineFlags(fs *demo.Flags, cfg *config) {
	cfg.conn.Register(fs)
	fs.StringVar(&cfg.prefix, "prefix", "/orchestrator-example/roles", "etcd prefix of the Source and the owner")
	fs.IntAtLeast(&cfg.tasks, "tasks", 100, 1, "number of tasks")
	fs.IntAtLeast(&cfg.captures, "captures", 3, 1, "number of captures (processor workers)")
	fs.PositiveDuration(&cfg.timeout, "timeout", 30*time.Second, "give up after this long")
	fs.PositiveDuration(&cfg.interval, "interval", 5*time.Millisecond, "the workers' timer interval")
}

// keys is the plain state of both roles: every key under the worker's
// prefix, relative to it, with its value.
type keys struct {
	prefix  string
	values  map[string]string
	patches [][]orchestrator.DataPatch
}

func newKeys(prefix string) *keys {
	return &keys{prefix: util.NormalizePrefix(prefix).String(), values: map[string]string{}}
}

func (s *keys) Update(key util.EtcdKey, value []byte, _ bool) error {
	rel := strings.TrimPrefix(key.String(), s.prefix)
	if value == nil {
		delete(s.values, rel)
	} else {
		s.values[rel] = string(value)
	}
	return nil
}

func (s *keys) GetPatches() [][]orchestrator.DataPatch {
	p := s.patches
	s.patches = nil
	return p
}

// group adds a patch group that puts the relative keys of puts and deletes
// those of dels.
func (s *keys) group(puts map[string]string, dels ...string) {
	var g []orchestrator.DataPatch
	for rel, v := range puts {
		g = append(g, setPatch(s.prefix+rel, []byte(v)))
	}
	for _, rel := range dels {
		g = append(g, setPatch(s.prefix+rel, nil))
	}
	s.patches = append(s.patches, g)
}

// setPatch sets key to value (nil deletes it).
func setPatch(key string, value []byte) orchestrator.DataPatch {
	return orchestrator.SingleDataPatch{Key: util.NewEtcdKey(key), Func: func([]byte) ([]byte, bool, error) {
		return value, true, nil
	}}
}

// owner hands each unassigned task to a capture, round robin, in one group
// per task: the task records its capture and the capture's todo gets it.
// It finishes once every task is done.
func owner(cfg config) orchestrator.ReactorFunc {
	next := 0
	return func(_ context.Context, st orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		s := st.(*keys)
		done := 0
		for i := range cfg.tasks {
			task := fmt.Sprintf("/task/%d", i)
			c, ok := s.values[task]
			switch {
			case !ok:
			case c == "":
				c = fmt.Sprintf("c%d", next%cfg.captures)
				next++
				s.group(map[string]string{task: c, "/capture/" + c + "/todo/" + fmt.Sprint(i): ""})
			default:
				if _, ok := s.values["/capture/"+c+"/done/"+fmt.Sprint(i)]; ok {
					done++
				}
			}
		}
		if done == cfg.tasks {
			return s, orchestrator.ErrReactorFinished
		}
		return s, nil
	}
}

// processor does the tasks in its capture's todo: one group per task marks
// it done and removes it from the todo. It sees its own prefix only.
func processor(ctx context.Context) orchestrator.ReactorFunc {
	return func(_ context.Context, st orchestrator.ReactorState) (orchestrator.ReactorState, error) {
		s := st.(*keys)
		for rel := range s.values {
			if n, ok := strings.CutPrefix(rel, "/todo/"); ok {
				if _, twice := s.values["/done/"+n]; twice {
					return s, fmt.Errorf("task %s is in todo and done", n)
				}
				s.group(map[string]string{"/done/" + n: ""}, rel)
			}
		}
		if ctx.Err() != nil {
			return s, orchestrator.ErrReactorFinished
		}
		return s, nil
	}
}

// run runs the demo, printing to out, and reports whether every task was
// done exactly once by its capture.
func run(ctx context.Context, cfg config, out io.Writer) (bool, error) {
	cfg.prefix = util.NormalizePrefix(cfg.prefix).String() // the keys it writes by hand are the library's
	env, err := demo.Setup(ctx, cfg.conn, "", out, fmt.Sprintf("roles: %d tasks, %d captures under %s",
		cfg.tasks, cfg.captures, cfg.prefix))
	if err != nil {
		return false, err
	}
	defer env.Close()
	cli := env.Client
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	if key, err := foreignKey(ctx, cli, cfg.prefix); err != nil {
		return false, err
	} else if key != "" {
		return false, fmt.Errorf("--prefix %s holds %s, which is not one of this demo's keys: the demo empties its prefix at the start, so give it a prefix of its own", cfg.prefix, key)
	}
	if _, err := cli.Delete(ctx, cfg.prefix+"/", clientv3.WithPrefix()); err != nil {
		return false, err
	}
	for i := range cfg.tasks {
		if _, err := cli.Put(ctx, fmt.Sprintf("%s/task/%d", cfg.prefix, i), ""); err != nil {
			return false, err
		}
	}
	src, err := orchestrator.NewSource(cli, cfg.prefix)
	if err != nil {
		return false, err
	}
	start := time.Now()
	ownerDone := make(chan struct{})
	procCtx, stopProcessors := context.WithCancel(context.Background())
	defer stopProcessors()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(ownerDone)
		w, err := orchestrator.NewEtcdWorker(cli, cfg.prefix, owner(cfg), newKeys(cfg.prefix), orchestrator.WithSource(src))
		if err != nil {
			return err
		}
		return w.Run(gctx, nil, cfg.interval, "owner")
	})
	for c := range cfg.captures {
		prefix := fmt.Sprintf("%s/capture/c%d", cfg.prefix, c)
		g.Go(func() error {
			w, err := orchestrator.NewEtcdWorker(cli, prefix, processor(procCtx), newKeys(prefix), orchestrator.WithSource(src))
			if err != nil {
				return err
			}
			return w.Run(gctx, nil, cfg.interval, fmt.Sprintf("processor-c%d", c))
		})
	}
	go func() {
		select {
		case <-ownerDone:
		case <-gctx.Done():
		}
		stopProcessors() // the processors finish at their next Tick
	}()
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		return false, err
	}
	fmt.Fprintf(out, "the owner saw every task done after %v\n", time.Since(start).Round(time.Millisecond))
	return verify(ctx, cli, cfg, out)
}

// demoDirs are the folders of the keys the demo writes under its prefix, in
// key order: the workers' bookkeeping, the captures' prefixes and the tasks.
var demoDirs = []string{"/__orchestrator/", "/capture/", "/task/"}

// foreignKey returns a key under prefix that lies outside demoDirs ("" when
// there is none), so that the demo never empties a prefix holding someone
// else's data (--prefix / would otherwise delete every key under "/"). It
// reads the gaps between the folders, one key at most from each.
func foreignKey(ctx context.Context, cli *clientv3.Client, prefix string) (string, error) {
	from := prefix + "/"
	end := clientv3.GetPrefixRangeEnd(from)
	for i := 0; i <= len(demoDirs); i++ {
		to := end
		if i < len(demoDirs) {
			to = prefix + demoDirs[i]
		}
		resp, err := cli.Get(ctx, from, clientv3.WithRange(to), clientv3.WithKeysOnly(), clientv3.WithLimit(1))
		if err != nil {
			return "", err
		}
		if len(resp.Kvs) > 0 {
			return string(resp.Kvs[0].Key), nil
		}
		if i < len(demoDirs) {
			from = clientv3.GetPrefixRangeEnd(to)
		}
	}
	return "", nil
}

// verify reads etcd back: every task assigned to one capture and done by it,
// once, with nothing left to do.
func verify(ctx context.Context, cli *clientv3.Client, cfg config, out io.Writer) (bool, error) {
	resp, err := cli.Get(ctx, cfg.prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return false, err
	}
	kv := map[string]string{}
	for _, x := range resp.Kvs {
		kv[strings.TrimPrefix(string(x.Key), cfg.prefix)] = string(x.Value)
	}
	done, todo := 0, 0
	for rel := range kv {
		switch {
		case strings.Contains(rel, "/done/"):
			done++
		case strings.Contains(rel, "/todo/"):
			todo++
		}
	}
	ok := done == cfg.tasks && todo == 0
	for i := range cfg.tasks {
		c := kv[fmt.Sprintf("/task/%d", i)]
		if _, has := kv[fmt.Sprintf("/capture/%s/done/%d", c, i)]; c == "" || !has {
			ok = false
		}
	}
	verdict := "OK"
	if !ok {
		verdict = "BROKEN"
	}
	fmt.Fprintf(out, "tasks done: %d of %d, left to do: %d (%s)\n", done, cfg.tasks, todo, verdict)
	return ok, nil
}
