// CPU split for the JVM tests: after "ready" and a line on stdin, the main thread alternates between
// hotA (three units of work) and hotB (one) for SECONDS seconds, and prints the thread CPU time each
// method took as measured by the JVM (a=<s> b=<s>): the truth the profile's split is held to.
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;

public class CpuSplit {
    static volatile long sink;

    static void hotA(int units) {
        for (int u = 0; u < units; u++) {
            for (int i = 0; i < 20_000; i++) {
                sink += i;
            }
        }
    }

    static void hotB(int units) {
        for (int u = 0; u < units; u++) {
            for (int i = 0; i < 20_000; i++) {
                sink += i;
            }
        }
    }

    public static void main(String[] args) throws Exception {
        double seconds = Double.parseDouble(args[0]);
        ThreadMXBean bean = ManagementFactory.getThreadMXBean();
        System.out.println("ready");
        System.out.flush();
        System.in.read();
        long a = 0, b = 0;
        long end = System.nanoTime() + (long) (seconds * 1e9);
        while (System.nanoTime() < end) {
            long t0 = bean.getCurrentThreadCpuTime();
            hotA(3);
            long t1 = bean.getCurrentThreadCpuTime();
            hotB(1);
            long t2 = bean.getCurrentThreadCpuTime();
            a += t1 - t0;
            b += t2 - t1;
        }
        System.out.println("a=" + a / 1e9 + " b=" + b / 1e9);
    }
}
