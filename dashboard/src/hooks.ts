// Data that refreshes itself: lists and figures have no long-poll route, so
// they are read again every few seconds while the screen shows them.

import { useEffect, useRef, useState } from "preact/hooks";
import { message } from "./session";

export function usePolled<T>(load: (signal: AbortSignal) => Promise<T>, everyMs: number, deps: unknown[]) {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);
  const loadRef = useRef(load);
  loadRef.current = load;
  useEffect(() => {
    const abort = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const run = async () => {
      try {
        setData(await loadRef.current(abort.signal));
        setError(null);
      } catch (e) {
        if (!abort.signal.aborted) setError(message(e));
      }
      if (!abort.signal.aborted) timer = setTimeout(run, everyMs);
    };
    run();
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [...deps, tick]);
  return { data, error, reload: () => setTick((t) => t + 1) };
}
