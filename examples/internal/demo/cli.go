package demo

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Parse parses args, the command line of the program fs is named after, into
// the flags defined on fs, then runs check (which should validate the
// program's flags, including ConnConfig.Validate). It returns ok when the
// program should run. Otherwise it returns the exit code:
//
//   - 0 after --help (or -h), which prints about (one line saying what the
//     program shows), a usage line and the flags to stdout;
//   - 2 for an undefined flag, a malformed value, a stray argument or an
//     error from check, printed to stderr as one line that names the flag.
func Parse(fs *flag.FlagSet, about string, args []string, stdout, stderr io.Writer, check func() error) (code int, ok bool) {
	// The flag package prints the whole usage on every error; one line is
	// what a user needs.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printUsage(stdout, fs, about)
		return 0, false
	case err != nil:
	case fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q (all options are --flags)", fs.Arg(0))
	default:
		err = check()
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s (see --help)\n", fs.Name(), oneLine(err.Error()))
		return 2, false
	}
	return 0, true
}

// printUsage writes the help text of fs to w: about on the first line, then
// a usage line and the flags with their defaults.
func printUsage(w io.Writer, fs *flag.FlagSet, about string) {
	fmt.Fprintln(w, about)
	fmt.Fprintf(w, "\nUsage: %s [flags]\n\nFlags:\n", fs.Name())
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// Program is the whole of a demo program named name: it parses args with
// parse (which returns the config, and the exit code unless ok, as Parse
// does), then runs run with the config under Main, printing to stdout. It
// returns the exit code (0 OK, 1 error or broken invariant, 2 bad flags).
func Program[C any](name string, args []string, stdout, stderr io.Writer,
	parse func(args []string, stdout, stderr io.Writer) (cfg C, code int, ok bool),
	run func(ctx context.Context, cfg C, out io.Writer) (bool, error),
) int {
	cfg, code, ok := parse(args, stdout, stderr)
	if !ok {
		return code
	}
	return Main(name, stderr, func(ctx context.Context) (bool, error) { return run(ctx, cfg, stdout) })
}

// Main runs a demo until it ends or SIGINT/SIGTERM and returns the process
// exit code: 0 when run reports that the invariants held, 1 otherwise (an
// error is printed to stderr on one line with the demo's name). A second
// Ctrl-C kills the process.
func Main(name string, stderr io.Writer, run func(ctx context.Context) (bool, error)) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// Restore the default handling once the first signal arrived.
		<-ctx.Done()
		stop()
	}()
	ok, err := run(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s\n", name, oneLine(err.Error()))
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}
