"""Process stage: reading HotSpot JVMs from outside the process. `discover` finds libjvm.so in a process
and reads HotSpot's own description of its data structures (`vmstructs`), by name, so that the frame
walker and the method reader build on offsets each JVM states rather than tables per JDK.
"""
